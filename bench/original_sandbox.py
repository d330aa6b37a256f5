"""The original SANDBOX's request pattern, as the baseline of the simulation benchmark.

The original script ran one interaction as a chain of blocking OpenAI calls — 16 sequential
round trips (the figure measured on the original and quoted in issue 3) — over a pool of threads,
and built each agent's memory by embedding every prior entry with its own request. We reproduce
that pattern with the same `openai` client against the same local server, so the comparison
isolates the scheduling: the chain below is our reconstruction of those 16 round trips
(embed the question; draft; per partner (4): embed the draft for the partner's retrieval, then
feedback; revise; 4 observer ratings one after another; embed the revision for memory).
The pool of 10 threads reproduces the original's measured 3.0 interactions/s at 200 ms.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai

from stablealign.sandbox.data import load_hh_pairs, load_questions

THREADS = 10
PARTNERS = 4
PRIOR = 50


@dataclass
class BaselineResult:
    latency_ms: float
    agents_measured: int
    interactions_per_second: float
    setup_seconds: float  # scaled to the benchmark's agent count
    sequential_round_trips: int
    requests_per_interaction: float


def _interaction(client: openai.OpenAI, question: str) -> int:
    calls = 0

    def chat(prompt: str) -> str:
        nonlocal calls
        calls += 1
        reply = client.chat.completions.create(model="fake-gpt", messages=[{"role": "user", "content": prompt}])
        return reply.choices[0].message.content or ""

    def embed(text: str) -> None:
        nonlocal calls
        calls += 1
        client.embeddings.create(model="fake-embedding", input=[text])

    embed(question)
    draft = chat(f"Answer as a social agent.\nQuestion: {question}")
    feedback = []
    for _ in range(PARTNERS):
        embed(draft)
        feedback.append(chat(f"Rate this answer 1-7. Rating: <n> ### Reason: <text>\nQ: {question}\nA: {draft}"))
    revised = chat(f"Revise your answer given the feedback {feedback}.\nQ: {question}\nA: {draft}")
    for aspect in ("alignment", "engagement"):
        for answer in (draft, revised):
            chat(f"Rate the {aspect} of this answer 1-7. Rating: <n> ### Reason: <text>\nQ: {question}\nA: {answer}")
    embed(revised)
    return calls


def run_baseline(latency_ms: float, agents: int, scale_setup_to: int) -> BaselineResult:
    """Runs ``agents`` interactions (one round) and their setup against the already running fake server."""
    base_url = os.environ.get("STABLEALIGN_BENCH_OPENAI_URL")
    if not base_url:
        raise RuntimeError("STABLEALIGN_BENCH_OPENAI_URL is not set (bench.simulation sets it)")
    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=60)
    pairs = load_hh_pairs()
    questions = load_questions()
    with ThreadPoolExecutor(THREADS) as pool:
        started = time.perf_counter()
        list(pool.map(lambda i: client.embeddings.create(model="fake-embedding",
                                                         input=[pairs[i % len(pairs)].question]),
                      range(agents * PRIOR)))
        setup = (time.perf_counter() - started) * scale_setup_to / agents
        started = time.perf_counter()
        calls = list(pool.map(lambda i: _interaction(client, questions[i % len(questions)]), range(agents)))
        elapsed = time.perf_counter() - started
    return BaselineResult(latency_ms=latency_ms, agents_measured=agents, interactions_per_second=agents / elapsed,
                          setup_seconds=setup, sequential_round_trips=calls[0],
                          requests_per_interaction=sum(calls) / len(calls))
