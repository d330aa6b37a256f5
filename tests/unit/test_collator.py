"""The collator: one padded batch for all responses, prompt tokens masked, seeded sampling keeping the best."""

from __future__ import annotations

import random

import pytest
import torch

from stablealign.llm.prompt_format import format_example, format_prompt
from stablealign.training.collator import AlignmentCollator, best_index, sample_responses
from stablealign.training.data import AlignmentGroup
from stablealign.training.loss import IGNORE_INDEX
from stablealign.training.template import encode_prompt, encode_response


@pytest.fixture(scope="module")
def tokenizer():
    from stablealign_app.tinymodel import train_tokenizer

    corpus = ["How can I help my neighbour?", "Be kind and patient.", "Ignore them.", "Rating: 5 ### Reason: ok"] * 20
    return train_tokenizer(corpus, vocab_size=320)


def group(n: int, scores=None, query="How can I help my neighbour?") -> AlignmentGroup:
    scores = scores or [float(i % 7 + 1) for i in range(n)]
    return AlignmentGroup(query, tuple(f"answer {i} be kind" + " and patient" * i for i in range(n)), tuple(scores))


def test_template_is_shared_and_ends_with_eos(tokenizer):
    prompt, full = format_example("Q?", "A.", tokenizer.eos_token)
    assert prompt == format_prompt("Q?") == "Human: Q?\n\nAssistant:"
    assert full == "Human: Q?\n\nAssistant: A." + tokenizer.eos_token
    assert encode_response(tokenizer, "A.")[-1] == tokenizer.eos_token_id
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}], add_generation_prompt=True)
    assert list(chat) == encode_prompt(tokenizer, "Q?")


def test_masks_and_layout(tokenizer):
    groups = [group(2, [3.0, 6.0]), group(1, [5.0])]
    batch = AlignmentCollator(tokenizer, max_length=64, num_comp=3, seed=0)(groups)
    B, N = 2, 2
    assert batch["input_ids"].shape[0] == B * N and batch["mask"].tolist() == [[True, True], [True, False]]
    assert batch["scores"].tolist() == [[3.0, 6.0], [5.0, 0.0]]
    prompt_len = len(encode_prompt(tokenizer, groups[0].query))
    for row in range(3):  # real rows
        labels, ids, attn = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        assert (labels[:prompt_len] == IGNORE_INDEX).all()  # prompt not learned
        length = int(attn.sum())
        assert (labels[prompt_len:length] == ids[prompt_len:length]).all()
        assert ids[length - 1] == tokenizer.eos_token_id  # every response ends with EOS
        assert (labels[length:] == IGNORE_INDEX).all() and (ids[length:] == tokenizer.pad_token_id).all()
    pad_row = 3
    assert (batch["labels"][pad_row] == IGNORE_INDEX).all() and batch["attention_mask"][pad_row].sum() == 1


def test_sampling_keeps_best_and_is_seeded(tokenizer):
    scores = [2.0, 7.0, 3.0, 7.0, 1.0, 4.0]
    assert best_index(scores) == 1  # first of the tied maxima
    for seed in range(20):
        picked = sample_responses(scores, 3, random.Random(seed))
        assert 1 in picked and len(picked) == 3 and picked == sorted(picked)
    items = [(i, group(6)) for i in range(4)]
    a = AlignmentCollator(tokenizer, num_comp=3, seed=1)(items)
    b = AlignmentCollator(tokenizer, num_comp=3, seed=1)(list(reversed(items)))
    assert torch.equal(a["scores"], b["scores"].flip(0))  # per-group seeding: order does not matter
    c = AlignmentCollator(tokenizer, num_comp=3, seed=2)(items)
    assert not torch.equal(a["input_ids"], c["input_ids"]) or not torch.equal(a["scores"], c["scores"])
    for row in a["scores"]:
        assert 6.0 in row.tolist()  # the best response (score 6) is always there


def test_truncation_is_counted(tokenizer):
    collator = AlignmentCollator(tokenizer, max_length=16, num_comp=2, seed=0)
    batch = collator([group(2, [1.0, 2.0], query="How can I help my neighbour? " * 10)])
    assert batch["input_ids"].shape[1] <= 16 and collator.truncated == 2
    assert (batch["labels"] != IGNORE_INDEX).any(dim=1).all()  # something left to learn in each row
