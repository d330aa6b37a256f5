"""hf backend benchmark: continuous batching against one ``model.generate`` at a time.

    python -m bench.hf_batching [--model smollm2-135m-instruct] [--concurrency 1,8,32]
                                [--max-new-tokens 64] [--requests 32] [--out results.json]

The same requests every time: the first ``--requests`` questions of the project's question pool,
each as one user message through the model's chat template, greedy, ``--max-new-tokens`` new
tokens at most. Measured in one run, on one loaded copy of the model:

- the baseline, the old way: a plain ``model.generate`` per request, one after another;
- the batched ``HFChatBackend`` with 1, 8, 32... requests in flight at once (an asyncio semaphore
  holds the rest back), i.e. what a service sees when that many SANDBOX calls arrive together.

Reported per run: generated tokens, seconds, tokens/s, the ratio to the baseline's tokens/s, the
peak RSS of the process during that run (sampled every 20 ms), and how many answers are the same
text as the baseline's (greedy: all of them, up to float rounding at exact ties). Target: >= 5x the
baseline's tokens/s at 32 concurrent requests. The 1-minute load average is printed before and
after, since a busy machine skews every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

TARGET_CONCURRENCY = 32
TARGET_SPEEDUP = 5.0


@dataclass
class RunResult:
    mode: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    peak_rss_mib: float
    same_as_baseline: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@contextmanager
def peak_rss(into: dict[str, float], interval: float = 0.02):
    """Samples this process's RSS while the block runs; ``into["mib"]`` gets the peak."""
    process = psutil.Process()
    stop = threading.Event()
    peak = [process.memory_info().rss]

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        into["mib"] = max(peak[0], process.memory_info().rss) / 2 ** 20


def baseline(backend: Any, requests: list[Any], max_new: int) -> tuple[RunResult, list[str]]:
    """The old way: ``model.generate`` for one request after another, on the backend's model."""
    import torch

    from stablealign.llm.prompt_format import cut_at_stop

    model, tokenizer = backend._model, backend._tokenizer
    texts: list[str] = []
    tokens = 0
    rss: dict[str, float] = {}
    with peak_rss(rss), torch.inference_mode():
        started = time.perf_counter()
        for request in requests:
            ids, _ = backend._prompt_ids(request)
            prompt = torch.tensor([ids])
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
            new = output[0, prompt.shape[1]:]
            tokens += int(new.shape[0])
            texts.append(cut_at_stop(tokenizer.decode(new, skip_special_tokens=True)))
        seconds = time.perf_counter() - started
    return RunResult("generate, one at a time", 1, len(requests), tokens, seconds, rss["mib"]), texts


async def batched(backend: Any, requests: list[Any], concurrency: int, reference: list[str]) -> RunResult:
    """All ``requests`` through the backend with ``concurrency`` in flight at once."""
    gate = asyncio.Semaphore(concurrency)

    async def one(request: Any) -> Any:
        async with gate:
            return await backend.chat(request)

    rss: dict[str, float] = {}
    with peak_rss(rss):
        started = time.perf_counter()
        replies = await asyncio.gather(*(one(r) for r in requests))
        seconds = time.perf_counter() - started
    same = sum(r.text == t for r, t in zip(replies, reference, strict=True))
    return RunResult("HFChatBackend, batched", concurrency, len(requests), sum(r.completion_tokens for r in replies),
                     seconds, rss["mib"], same)


async def run(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Any]]:
    from stablealign.llm.backends.base import ChatMessage, ChatRequest
    from stablealign.llm.backends.hf import HFChatBackend
    from stablealign.sandbox.data import default_questions_path, load_questions

    questions = list(load_questions(default_questions_path()))[: args.requests]
    requests = [ChatRequest([ChatMessage("user", q)], max_tokens=args.max_new_tokens, temperature=0.0)
                for q in questions]
    backend = HFChatBackend(args.model, max_new_tokens=args.max_new_tokens, max_concurrency=max(args.concurrency),
                            max_batch=max(args.concurrency))
    await asyncio.to_thread(backend._load)
    # Warm-up of both paths (first-call allocations), not timed.
    await backend.chat(ChatRequest([ChatMessage("user", "Hello")], max_tokens=4, temperature=0.0))
    await asyncio.to_thread(baseline, backend, requests[:1], 4)
    base, reference = await asyncio.to_thread(baseline, backend, requests, args.max_new_tokens)
    results = [base]
    for concurrency in args.concurrency:
        # Warm-up at this concurrency (the process's first large batches are slow: allocator growth).
        short = [dataclasses.replace(r, max_tokens=4) for r in requests[:concurrency]]
        await batched(backend, short, concurrency, [""] * len(short))
        results.append(await batched(backend, requests, concurrency, reference))
    info = {"engine_steps": backend._engine.steps, "max_rows_seen": backend._engine.max_rows_seen,
            "prompt_tokens": [len(backend._prompt_ids(r)[0]) for r in requests]}
    await backend.aclose()
    return results, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a known model's name or a model directory")
    parser.add_argument("--concurrency", default="1,8,32", help="requests in flight at once, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32, help="the first N questions of the question pool")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error("--concurrency: expected comma-separated integers, e.g. 1,8,32")
    if not args.concurrency or min(args.concurrency) < 1 or args.requests < 1 or args.max_new_tokens < 1:
        parser.error("--concurrency, --requests and --max-new-tokens must be >= 1")

    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    load_before = os.getloadavg()[0]
    results, info = asyncio.run(run(args))
    load_after = os.getloadavg()[0]
    base = results[0].tokens_per_second
    table = Table(title=f"{args.model} on {torch.device('cpu')} ({os.cpu_count()} cores, torch threads "
                        f"{torch.get_num_threads()}): {args.requests} questions, greedy, <= {args.max_new_tokens} "
                        "new tokens")
    for column in ("mode", "in flight", "tokens", "seconds", "tokens/s", "x baseline", "peak RSS MiB",
                   "same text as baseline"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for r in results:
        same = "-" if r.same_as_baseline is None else f"{r.same_as_baseline}/{r.requests}"
        table.add_row(r.mode, str(r.concurrency), str(r.tokens), f"{r.seconds:.1f}", f"{r.tokens_per_second:.1f}",
                      f"{r.tokens_per_second / base:.2f}", f"{r.peak_rss_mib:.0f}", same)
    console.print(table)
    prompts = info["prompt_tokens"]
    console.print(f"prompt tokens: {min(prompts)}-{max(prompts)} (mean {sum(prompts) / len(prompts):.0f}); "
                  f"engine decoding steps: {info['engine_steps']}; most rows decoded together: "
                  f"{info['max_rows_seen']}; process peak RSS (getrusage): "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    console.print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    target = next((r for r in results[1:] if r.concurrency == TARGET_CONCURRENCY), None)
    if target is not None:
        ratio = target.tokens_per_second / base
        console.print(f"speed-up at {TARGET_CONCURRENCY} in flight: {ratio:.2f}x (target >= {TARGET_SPEEDUP:.0f}x)")
    if args.out:
        summary = {"model": args.model, "requests": args.requests, "max_new_tokens": args.max_new_tokens,
                   "results": [{**asdict(r), "tokens_per_second": r.tokens_per_second} for r in results],
                   "load_average_before": load_before, "load_average_after": load_after, **info}
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
