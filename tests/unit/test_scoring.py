"""Shared-prompt scoring gives the figures of one plain forward per (prompt, response) row."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from stablealign.training import scoring  # noqa: E402
from stablealign.training.generate import load_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def rows(tokenizer) -> list[tuple[list[int], int]]:
    """Pairs sharing a prompt, a prompt with three responses, prompts and responses of many lengths."""
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for p, responses in [("Human: how do I bake bread? Assistant:", [" Knead it.", " I will not help with that, sorry."]),
                         ("Human: hi Assistant:", [" Hello there, how can I help you today with anything?"]),
                         ("Human: a much longer question about the weather and the sea and the hills? Assistant:",
                          [" Rain.", " It depends on the season where you live.", " No."]),
                         ("Human: x Assistant:", [" y"])]:
        prompt = enc(p)
        out.extend((prompt + enc(r) + [tokenizer.eos_token_id], len(prompt)) for r in responses)
    return out


@pytest.mark.parametrize("budget", [1, 40, 4096])
def test_shared_prompts_score_as_full_forwards(tiny, budget):
    model, tokenizer = tiny
    encoded = rows(tokenizer)
    shared = scoring.response_logprobs(model, encoded, tokenizer.pad_token_id, token_budget=budget)
    plain = scoring._full_forward_logprobs(model, encoded, tokenizer.pad_token_id, 4096)
    assert [n for _, n in shared] == [len(ids) - p for ids, p in encoded]
    assert [n for _, n in plain] == [len(ids) - p for ids, p in encoded]
    for (a, _), (b, _) in zip(shared, plain):
        assert a == pytest.approx(b, rel=1e-6)  # float rounding only
    # and the plain computation is itself the model's own: row 0 alone, unpadded
    ids, prompt_len = encoded[0]
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    alone = sum(float(logprobs[t - 1, ids[t]]) for t in range(prompt_len, len(ids)))
    assert plain[0][0] == pytest.approx(alone, abs=1e-4)
    assert all(v < 0 for v, _ in shared)


def test_bf16_scoring_rounds_only_where_the_device_computes_bf16(tiny):
    from stablealign.llm.backends.batching import native_bf16

    model, tokenizer = tiny
    encoded = rows(tokenizer)
    exact = scoring.response_logprobs(model, encoded, tokenizer.pad_token_id)
    with scoring.scoring_autocast(False, "cpu"):
        assert scoring.response_logprobs(model, encoded, tokenizer.pad_token_id) == exact
    with scoring.scoring_autocast(True, "cpu"):
        assert torch.is_autocast_cpu_enabled() == native_bf16()
        rounded = scoring.response_logprobs(model, encoded, tokenizer.pad_token_id)
    assert not torch.is_autocast_cpu_enabled()
    assert [n for _, n in rounded] == [n for _, n in exact]
    for (a, _), (b, _) in zip(rounded, exact):
        assert a == pytest.approx(b, abs=0.05 * len(encoded[0][0]))  # bf16 rounding, not another model


def test_heldout_loss_is_the_training_forwards_loss(tiny):
    """Shared-prompt scoring of held-out groups gives what the training step computes on the collated groups."""
    from stablealign.training.collator import AlignmentCollator
    from stablealign.training.data import AlignmentGroup
    from stablealign.training.evaluate import heldout_loss
    from stablealign.training.loss import batch_response_losses, stable_alignment_loss_parts

    model, tokenizer = tiny
    groups = [AlignmentGroup("How do I bake bread?", ("Knead it and wait.", "No.", "I will not help."), (5.0, 2.0, 3.5)),
              AlignmentGroup("hi", ("Hello there, how can I help you today?",), (4.0,)),
              AlignmentGroup("a much longer question about the weather and the sea " * 6, ("Rain.", "Sun."), (3.0, 3.0))]
    got = heldout_loss(model, tokenizer, groups, max_length=48)
    collator = AlignmentCollator(tokenizer, max_length=48, num_comp=3, seed=0)
    expected = []
    for group in groups:
        batch = collator([group])
        with torch.no_grad():
            losses = batch_response_losses(model, batch, logits_to_keep=False)
        expected.append(float(stable_alignment_loss_parts(losses, batch["scores"], batch["mask"]).loss))
    assert got["groups"] == 3 and got["items"] == pytest.approx(expected, rel=1e-4)
    assert got["loss"] == pytest.approx(sum(expected) / 3, rel=1e-4)
