"""The Stable Alignment loss against a plain per-group reference (DESIGN §1)."""

from __future__ import annotations

import pytest
import torch

from services.trainer.loss import (
    IGNORE_INDEX,
    per_response_token_loss,
    stable_alignment_loss,
    stable_alignment_loss_parts,
)


def reference_group(losses: list[float], scores: list[float], *, margin=10.0, ratio=0.2, rating_scale=7.0,
                    max_flow=False) -> float:
    """One group, written the plain way: lists and a Python loop."""
    best = scores.index(max(scores))  # first index of the max
    terms = [losses[best] - losses[i] + margin * (scores[best] - scores[i]) / rating_scale
             for i in range(len(losses)) if i != best]
    if not terms:
        diff = 0.0
    elif max_flow:
        diff = max(terms)
    else:
        diff = sum(terms) / len(terms)
    return losses[best] + ratio * max(0.0, diff)


def reference(losses, scores, mask, **kw) -> float:
    values = []
    for row_l, row_s, row_m in zip(losses.tolist(), scores.tolist(), mask.tolist()):
        real = [i for i, m in enumerate(row_m) if m]
        values.append(reference_group([row_l[i] for i in real], [row_s[i] for i in real], **kw))
    return sum(values) / len(values)


@pytest.mark.parametrize("max_flow", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_on_random_inputs(seed, max_flow):
    gen = torch.Generator().manual_seed(seed)
    B, N = 5, 4
    losses = torch.rand(B, N, generator=gen, dtype=torch.float64) * 4
    scores = torch.randint(1, 8, (B, N), generator=gen).double()  # integer ratings: many ties
    mask = torch.rand(B, N, generator=gen) < 0.7
    mask[:, 0] |= ~mask.any(dim=1)  # every group has a real response
    mask[0] = False
    mask[0, 2] = True  # a single-response group (pure SFT)
    kw = dict(margin=10.0, ratio=0.2, rating_scale=7.0, max_flow=max_flow)
    got = stable_alignment_loss(losses, scores, mask, **kw)
    assert got.item() == pytest.approx(reference(losses, scores, mask, **kw), abs=1e-12)


@pytest.mark.parametrize("kw", [dict(margin=1.0, ratio=0.5, rating_scale=10.0), dict(margin=3.0, ratio=1.0)])
def test_other_hyper_parameters(kw):
    gen = torch.Generator().manual_seed(7)
    losses = torch.rand(3, 3, generator=gen, dtype=torch.float64)
    scores = torch.rand(3, 3, generator=gen, dtype=torch.float64) * 7
    mask = torch.ones(3, 3, dtype=torch.bool)
    assert stable_alignment_loss(losses, scores, mask, **kw).item() == pytest.approx(
        reference(losses, scores, mask, **kw), abs=1e-12)


def test_ties_first_index_wins():
    # Scores tie between 0 and 2; best must be index 0 (loss 1.0), not 2 (loss 3.0).
    losses = torch.tensor([[1.0, 2.0, 3.0]])
    scores = torch.tensor([[5.0, 1.0, 5.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = stable_alignment_loss_parts(losses, scores, mask, ratio=0.0)
    assert out.sft.item() == pytest.approx(1.0)
    # A padded slot holding a higher score is ignored.
    scores = torch.tensor([[5.0, 1.0, 9.0]])
    mask = torch.tensor([[True, True, False]])
    assert stable_alignment_loss_parts(losses, scores, mask, ratio=0.0).sft.item() == pytest.approx(1.0)


def test_margin_uses_each_responses_own_score():
    # L_b = 1, others 1 and 1; scores 7, 6, 1 -> terms m = 10/7 and 60/7; D = mean = 35/7 = 5.
    losses = torch.tensor([[1.0, 1.0, 1.0]])
    scores = torch.tensor([[7.0, 6.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = stable_alignment_loss_parts(losses, scores, mask, margin=10.0, ratio=0.2, rating_scale=7.0)
    assert out.penalty.item() == pytest.approx(0.2 * 5.0)
    out = stable_alignment_loss_parts(losses, scores, mask, max_flow=True)
    assert out.penalty.item() == pytest.approx(0.2 * 60 / 7)
    # The original read sorted_ratings[idx] (idx an unsorted position); with scores 1, 7, 6 that
    # would use the wrong score for the margins. Ours is permutation-invariant:
    perm = torch.tensor([2, 0, 1])
    again = stable_alignment_loss_parts(losses[:, perm], scores[:, perm], mask, margin=10.0, ratio=0.2)
    assert again.loss.item() == pytest.approx(1.0 + 0.2 * 5.0)


def test_single_response_group_is_pure_sft_and_penalty_clamped_at_zero():
    losses = torch.tensor([[2.5, 0.0], [0.1, 5.0]])
    scores = torch.tensor([[3.0, 0.0], [7.0, 6.9]])
    mask = torch.tensor([[True, False], [True, True]])
    out = stable_alignment_loss_parts(losses, scores, mask)
    # group 0: n = 1 -> 2.5; group 1: D = 0.1 - 5.0 + 10*0.1/7 < 0 -> 0.1
    assert out.loss.item() == pytest.approx((2.5 + 0.1) / 2)
    assert out.penalty.item() == 0.0


def test_padded_slots_get_no_gradient_and_do_not_leak_nan():
    losses = torch.tensor([[1.0, 2.0, float("nan")], [0.5, float("inf"), 3.0]], requires_grad=True)
    scores = torch.tensor([[6.0, 2.0, float("nan")], [4.0, 7.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    for max_flow in (False, True):
        if losses.grad is not None:
            losses.grad = None
        loss = stable_alignment_loss(losses, scores, mask, max_flow=max_flow)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(losses.grad).all()
        assert losses.grad[0, 2] == 0 and losses.grad[1, 1] == 0
        assert (losses.grad[mask] != 0).any()


def test_batch_equals_mean_of_singles():
    gen = torch.Generator().manual_seed(3)
    losses = torch.rand(4, 3, generator=gen, dtype=torch.float64) * 3
    scores = torch.randint(1, 8, (4, 3), generator=gen).double()
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    batch = stable_alignment_loss(losses, scores, mask)
    singles = [stable_alignment_loss(losses[i:i + 1], scores[i:i + 1], mask[i:i + 1]) for i in range(4)]
    assert batch.item() == pytest.approx(torch.stack(singles).mean().item(), abs=1e-12)


def test_group_without_real_response_is_an_error():
    with pytest.raises(ValueError, match="no real response"):
        stable_alignment_loss(torch.ones(2, 2), torch.ones(2, 2), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="one shape"):
        stable_alignment_loss(torch.ones(2, 2), torch.ones(2, 3), torch.ones(2, 2, dtype=torch.bool))


def test_per_response_token_loss_matches_one_call_per_response():
    gen = torch.Generator().manual_seed(0)
    M, T, V = 4, 7, 11
    logits = torch.randn(M, T, V, generator=gen)
    labels = torch.randint(0, V, (M, T), generator=gen)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    labels[3] = IGNORE_INDEX  # a padded slot: no response token at all
    got = per_response_token_loss(logits, labels)
    for i in range(3):
        want = torch.nn.functional.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=IGNORE_INDEX)
        assert got[i].item() == pytest.approx(want.item(), abs=1e-6)
    assert got[3].item() == 0.0


def test_logits_window_gives_the_same_losses_as_full_logits():
    """Skipping logits of prompt-only positions must not change any per-response loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stablealign.training.loss import (
        IGNORE_INDEX,
        batch_response_losses,
        model_takes_logits_to_keep,
        response_logits_window,
    )

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    assert model_takes_logits_to_keep(model)
    input_ids = torch.randint(0, 50, (4, 12))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX          # prompts of 5..7 tokens
    labels[1, :7] = IGNORE_INDEX
    labels[3, 10:] = IGNORE_INDEX         # padding at the end
    labels[2, :] = IGNORE_INDEX           # a padded slot
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "mask": torch.ones(2, 2, dtype=torch.bool)}
    assert response_logits_window(labels) == 12 - 4
    with torch.no_grad():
        windowed = batch_response_losses(model, batch, logits_to_keep=True)
        full = batch_response_losses(model, batch, logits_to_keep=False)
    assert windowed.shape == (2, 2)
    torch.testing.assert_close(windowed, full, rtol=1e-6, atol=1e-6)


def test_the_loss_is_importable_at_the_contract_path():
    """DESIGN §3: ``from services.trainer.loss import stable_alignment_loss`` is the same function."""
    import services.trainer.loss as contract
    import stablealign.training.loss as library

    assert contract.stable_alignment_loss is library.stable_alignment_loss
    assert contract.IGNORE_INDEX == library.IGNORE_INDEX
