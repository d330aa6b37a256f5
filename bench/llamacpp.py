"""Throughput of llama.cpp's OpenAI-compatible server on a local GGUF: concurrent requests vs one at a time.

    python -m bench.llamacpp [--levels 1,8,32] [--max-tokens 64] [--configs 1x1,1x2,2x1]

For each server configuration (``RxT``: R server processes of T threads each, requests spread
over them round robin; ``RxTp``: the same with passive OpenMP waiting) the benchmark starts the
servers (bench/llamacpp_server.py) on the model's GGUF (``stablealign.llm.models``; SmolLM2-135M-Instruct
by default), then, through the project's openai backend (``OpenAIChatBackend``, the official SDK):

- the baseline: the first max(levels) questions of the project's question pool, one user message
  each, greedy, sent one at a time; per request its completion tokens and seconds;
- at each level N: the first N questions sent at once (at most N in flight);

and prints completion tokens/s at each level, the baseline's tokens/s over the same N requests,
their ratio, and the servers' peak RSS (psutil / VmHWM). Greedy decoding makes both runs generate
the same tokens, which is checked.

llama-cpp-python's server holds one model behind a lock: one request at a time per process, so
concurrency within one process only queues. More processes (``2x1``) are the way to serve
requests side by side on this server; on 2 cores they compete for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.llamacpp_server import LlamaCppServer
from stablealign.llm.backends.base import ChatMessage, ChatRequest, Completion, RetryPolicy
from stablealign.llm.backends.openai_backend import OpenAIChatBackend
from stablealign.llm.models import gguf_path, pull
from stablealign.sandbox.data import default_questions_path, load_questions

ALIAS = "smollm2"


@dataclass
class LevelResult:
    config: str
    concurrency: int
    requests: int
    completion_tokens: int
    seconds: float
    tokens_per_second: float
    baseline_tokens: int
    baseline_seconds: float
    baseline_tokens_per_second: float
    ratio: float
    same_tokens: bool


@dataclass
class ConfigResult:
    config: str
    replicas: int
    threads: int
    startup_seconds: float
    peak_rss_mb: float
    levels: list[LevelResult]


def request(question: str, max_tokens: int) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("user", question)], max_tokens=max_tokens, temperature=0.0, seed=0)


def parse_config(text: str) -> tuple[int, int, bool]:
    """``RxT`` -> (R processes, T threads each, passive OpenMP waiting if it ends in ``p``)."""
    text = text.strip().lower()
    passive = text.endswith("p")
    replicas, _, threads = text.rstrip("p").partition("x")
    return int(replicas), int(threads or 1), passive


async def _run(backends: list[OpenAIChatBackend], questions: list[str], max_tokens: int,
               concurrency: int) -> tuple[list[Completion], float]:
    """All ``questions`` with at most ``concurrency`` in flight, spread round robin; (replies, seconds)."""
    limit = asyncio.Semaphore(concurrency)

    async def one(index: int, question: str) -> Completion:
        async with limit:
            return await backends[index % len(backends)].chat(request(question, max_tokens))

    started = time.perf_counter()
    replies = await asyncio.gather(*(one(i, q) for i, q in enumerate(questions)))
    return list(replies), time.perf_counter() - started


async def bench_config(config: str, gguf: Path, questions: list[str], levels: list[int], max_tokens: int,
                       n_ctx: int, log_dir: Path) -> ConfigResult:
    replicas, threads, passive = parse_config(config)
    servers = [LlamaCppServer(gguf, n_ctx=n_ctx, n_threads=threads, alias=ALIAS,
                              env={"OMP_WAIT_POLICY": "PASSIVE"} if passive else {},
                              log_path=log_dir / f"llamacpp-{config}-{i}.log") for i in range(replicas)]
    started = time.perf_counter()
    try:
        for server in servers:
            server.start()
        startup = time.perf_counter() - started
        retry = RetryPolicy(attempts=2, timeout=600.0)
        backends = [OpenAIChatBackend(ALIAS, base_url=s.base_url, api_key="sk-local", timeout=600.0,
                                      max_concurrency=max(levels), retry=retry) for s in servers]
        try:
            await _run(backends, questions[:replicas], max_tokens, replicas)  # warm-up: first-call costs
            # Baseline: one at a time, timed per request, so that any prefix of it is the baseline of a level.
            baseline: list[tuple[Completion, float]] = []
            for i, question in enumerate(questions[:max(levels)]):
                replies, seconds = await _run([backends[i % replicas]], [question], max_tokens, 1)
                baseline.append((replies[0], seconds))
            results = []
            for level in levels:
                replies, seconds = await _run(backends, questions[:level], max_tokens, level)
                tokens = sum(r.completion_tokens for r in replies)
                base = baseline[:level]
                base_tokens = sum(r.completion_tokens for r, _ in base)
                base_seconds = sum(s for _, s in base)
                tps, base_tps = tokens / seconds, base_tokens / base_seconds
                results.append(LevelResult(config, level, level, tokens, round(seconds, 3), round(tps, 1), base_tokens,
                                           round(base_seconds, 3), round(base_tps, 1), round(tps / base_tps, 2),
                                           [r.text for r in replies] == [r.text for r, _ in base]))
                print(f"  {config} level {level}: {tps:.1f} tok/s vs {base_tps:.1f} one at a time", flush=True)
        finally:
            for backend in backends:
                await backend.aclose()
        peak = sum(s.peak_rss_bytes() or 0 for s in servers) / 2**20
    finally:
        for server in servers:
            server.stop()
    return ConfigResult(config, replicas, threads, round(startup, 2), round(peak, 1), results)


def table(results: list[ConfigResult], max_tokens: int) -> str:
    head = ("| server (procs x threads) | concurrent | requests | tokens | tok/s | one-at-a-time tok/s | ratio "
            "| same text | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for config in results:
        for level in config.levels:
            rows.append(f"| {config.config} | {level.concurrency} | {level.requests} | {level.completion_tokens} "
                        f"| {level.tokens_per_second} | {level.baseline_tokens_per_second} | {level.ratio} "
                        f"| {'yes' if level.same_tokens else 'no'} | {config.peak_rss_mb} |")
    return "\n".join(rows) + f"\n(greedy, max_tokens {max_tokens}; peak RSS summed over the config's processes)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a known model (stablealign.llm.models)")
    parser.add_argument("--levels", default="1,8,32", help="concurrent requests, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--configs", default="1x1,1x2,2x1",
                        help="server processes x threads each, comma-separated; a trailing p: OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--log-dir", type=Path, default=Path("runs/bench-llamacpp"), help="server logs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
    pull(args.model)
    gguf = gguf_path(args.model)
    questions = list(load_questions(default_questions_path())[:max(levels)])
    args.log_dir.mkdir(parents=True, exist_ok=True)
    print(f"llama.cpp server on {gguf.name}: levels {levels}, max_tokens {args.max_tokens}, configs {args.configs}",
          flush=True)
    results = [asyncio.run(bench_config(c.strip(), gguf, questions, levels, args.max_tokens, args.n_ctx, args.log_dir))
               for c in args.configs.split(",") if c.strip()]
    print(table(results, args.max_tokens))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
