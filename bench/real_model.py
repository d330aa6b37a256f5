"""Real-model throughput of the society, against what the model itself can do on this machine.

    python -m bench.real_model [--model smollm2-135m-instruct] [--sizes 3,8] [--rounds 1]
                               [--engines] [--llamacpp] [--training] [--baseline-src DIR]
                               [--json FILE]

Measured in one run:

- **the ceiling**: the model's own forward passes in this process (transformers, as the ``hf``
  backend runs it) — prefill tokens/s over a batch of prompts, in float32 and at the engine's prefill
  precision (bf16 where the CPU has it; that one is the ceiling), and float32 decode tokens/s at the
  batch sizes a round produces (1, 8, 32, 64 rows, one new token per row over a cached context);
- **the society**: ``stable-align run --size S --rounds R --backend hf`` with every other setting at
  its default, one child process per world: interactions per minute, tokens per second, the tokens
  an interaction costs by step (``world.json`` ``llm_tokens``: what each backend call reported), and
  the fraction of the ceiling — the seconds the ceiling would need for the world's prompt and
  generated tokens (prefill rate, and decode rate at the largest batch) over the world's wall time;
- with ``--baseline-src DIR`` the same worlds from another checkout (e.g. ``git worktree add DIR
  <commit>`` with ``stablealign/v1`` copied in): the ratio of today's code to it;
- with ``--engines``, 32 chat requests through our batching engine (``HFChatBackend``, all in flight)
  and through transformers' own continuous batching (``generate_batch``), greedy, same prompts;
- with ``--llamacpp``, the smallest world through llama.cpp's OpenAI-compatible server on the
  model's GGUF (``openai`` backend), where ``llama_cpp`` is installed;
- with ``--training``, our trainer's tokens/s on the model in float32 and in bf16 autocast, against a
  ceiling of a third of the prefill rate at the same precision.

A busy machine skews every figure: the 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DECODE_BATCHES = (1, 8, 32, 64)
STEPS = ("draft", "feedback", "revise", "rate_alignment", "rate_engagement")


def _model_path(name: str) -> Path:
    from stablealign.llm.models import resolve_model_path

    return Path(resolve_model_path(name))


def ceiling(model: str, *, context: int = 256, prefill_rows: int = 8, steps: int = 8) -> dict[str, Any]:
    """Prefill and decode tokens/s of the model's own forwards (no scheduling, no padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    from stablealign.llm.backends.batching import engine_settings, prefill_copy

    net = AutoModelForCausalLM.from_pretrained(_model_path(model), local_files_only=True).eval()
    reader = prefill_copy(net, engine_settings().prefill_dtype, "cpu")
    vocab = net.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab - 1, (max(prefill_rows, *DECODE_BATCHES), context), generator=generator)
    with torch.no_grad():
        prefills: dict[str, float] = {}
        for name, forward in {"float32": net, "engine": reader}.items():
            forward(input_ids=ids[:2, :32])  # warm-up
            started = time.perf_counter()
            forward(input_ids=ids[:prefill_rows], use_cache=False)
            prefills[name] = prefill_rows * context / (time.perf_counter() - started)
        prefill = prefills["engine"]
        decode: dict[int, float] = {}
        for rows in DECODE_BATCHES:
            cache = net(input_ids=ids[:rows], use_cache=True).past_key_values
            token = ids[:rows, -1:]
            started = time.perf_counter()
            for _ in range(steps):
                out = net(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode[rows] = rows * steps / (time.perf_counter() - started)
    return {"prefill_tokens_per_s": prefill, "prefill_float32_tokens_per_s": prefills["float32"],
            "prefill_dtype": "bfloat16" if reader is not net else "float32", "decode_tokens_per_s": decode,
            "context": context, "threads": torch.get_num_threads()}


def run_world(size: int, rounds: int, *, backend: list[str], src: Path | None = None,
              timeout: float = 7200) -> dict[str, Any]:
    """One ``stable-align run`` in a child process (code from ``src`` when given); its world.json."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STABLEALIGN_") or k in (
        "STABLEALIGN_MODELS_DIR", "STABLEALIGN_DATA_DIR", "STABLEALIGN_CACHE_DIR")}
    env.update({"STABLEALIGN_LOG_LEVEL": "WARNING", "STABLEALIGN_GRPC_PORT": "-1", "STABLEALIGN_METRICS_PORT": "-1"})
    if src is not None:
        env["PYTHONPATH"] = str(src)
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        out = Path(tmp) / "world"
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "stablealign_app.cli.main", "run", "--size", str(size), "--rounds", str(rounds),
             *backend, "--embedding-backend", "offline", "--seed", "1", "--timeout", str(int(timeout)),
             "--out", str(out)], env=env, cwd=src or REPO, capture_output=True, text=True, timeout=timeout + 120)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            return {"error": (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1],
                    "process_seconds": wall}
        world = json.loads((out / "world.json").read_text())
        records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]
    tokens = world.get("llm_tokens") or {}
    prompt = sum(t.get("prompt", 0) for t in tokens.values()) or sum(r.get("prompt_tokens", 0) for r in records)
    completion = (sum(t.get("completion", 0) for t in tokens.values())
                  or sum(r.get("completion_tokens", 0) for r in records))
    seconds = float(world["wall_seconds"])
    return {"size": size, "rounds": rounds, "interactions": len(records), "seconds": seconds,
            "process_seconds": wall, "interactions_per_min": 60 * len(records) / seconds,
            "prompt_tokens": prompt, "completion_tokens": completion,
            "tokens_per_s": (prompt + completion) / seconds, "generated_per_s": completion / seconds,
            "by_step": {step: {k: v / max(len(records), 1) for k, v in tokens.get(step, {}).items()} for step in STEPS
                        if step in tokens}}


def fraction_of_ceiling(world: dict[str, Any], top: dict[str, Any]) -> float | None:
    """Seconds the model's own forwards need for the world's tokens, over the world's wall time."""
    if "error" in world or not world["seconds"]:
        return None
    decode = max(top["decode_tokens_per_s"].values())
    needed = world["prompt_tokens"] / top["prefill_tokens_per_s"] + world["completion_tokens"] / decode
    return needed / world["seconds"]


def engines(model: str, requests: int = 32, max_new: int = 64) -> dict[str, Any]:
    """The same greedy chat requests through our engine and through transformers' ``generate_batch``."""
    from stablealign.llm.backends.base import ChatMessage, ChatRequest
    from stablealign.llm.backends.hf import HFChatBackend
    from stablealign.sandbox.data import default_questions_path

    questions = [line.strip() for line in default_questions_path().read_text().splitlines() if line.strip()][:requests]
    results: dict[str, Any] = {}

    async def ours() -> int:
        backend = HFChatBackend(model, max_concurrency=requests)
        try:
            done = await asyncio.gather(*(backend.chat(ChatRequest([ChatMessage("user", q)], max_tokens=max_new,
                                                                   temperature=0.0)) for q in questions[:1]))
            started = time.perf_counter()
            done = await asyncio.gather(*(backend.chat(ChatRequest([ChatMessage("user", q)], max_tokens=max_new,
                                                                   temperature=0.0)) for q in questions))
            results["ours"] = {"seconds": time.perf_counter() - started}
            return sum(c.completion_tokens for c in done)
        finally:
            await backend.aclose()

    tokens = asyncio.run(ours())
    results["ours"]["tokens"] = tokens
    results["ours"]["tokens_per_s"] = tokens / results["ours"]["seconds"]
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        path = _model_path(model)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        net = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa_paged",
                                                   dtype=torch.float32).eval()
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
                   for q in questions]
        config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, scheduler="fifo")
        started = time.perf_counter()
        out = net.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        seconds = time.perf_counter() - started
        generated = sum(len(r.generated_tokens) for r in out.values())
        if len(out) != len(prompts):
            raise RuntimeError(f"{len(prompts) - len(out)} of {len(prompts)} requests gave no result")
        results["transformers_cb"] = {"seconds": seconds, "tokens": generated, "tokens_per_s": generated / seconds}
    except Exception as exc:  # noqa: BLE001 - an engine that cannot run here is reported, not fatal
        results["transformers_cb"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return results


def llamacpp_world(model: str, size: int, rounds: int) -> dict[str, Any]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return {"error": f"llama_cpp not installed: {exc}"}
    from bench.llamacpp_server import LlamaCppServer
    from stablealign.llm.models import gguf_path

    with LlamaCppServer(gguf_path(model), n_threads=os.cpu_count() or 1) as server:
        return run_world(size, rounds, backend=["--backend", "openai", "--url", server.base_url,
                                                "--model", server.alias])


def training(model: str, *, steps: int = 5, batch: int = 4, max_length: int = 256) -> dict[str, Any]:
    """Our trainer (``stable-align train``) on the model, float32 and bf16 autocast, each in a child
    process on the same groups (HH-RLHF answers, 3 a group): the real tokens a second of its steps
    (the first step, warm-up, left out), from its ``train_log.jsonl``."""
    import random

    from stablealign.sandbox.data import load_hh_pairs

    pairs, rng = load_hh_pairs(), random.Random(0)
    groups = [{"query": pairs[i].question, "responses": [pairs[i].chosen, pairs[i].rejected, pairs[i + 7].chosen],
               "scores": rng.sample(range(1, 8), 3)} for i in range(steps * batch)]
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "groups.jsonl"
        data.write_text("".join(json.dumps(g) + "\n" for g in groups))
        for name, flag in (("float32", "--no-bf16"), ("bf16", "--bf16")):
            out = Path(tmp) / name
            command = [sys.executable, "-m", "stablealign.training.train", "--model", str(_model_path(model)),
                       "--data", str(data), "--out", str(out), "--max-steps", str(steps), "--batch-size", str(batch),
                       "--grad-accum", "1", "--max-length", str(max_length), "--save-steps", "0", "--num-comp", "3",
                       "--no-group-by-length", flag]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800,
                                  env={**os.environ, "STABLEALIGN_LOG_FORMAT": "json"})
            log = out / "train_log.jsonl"
            if done.returncode != 0 or not log.is_file():
                result[name] = {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
                continue
            rows = [json.loads(line) for line in log.read_text().splitlines()][1:]
            rates = [row["tokens_per_second"] for row in rows]
            result[name] = {"tokens_per_s": sum(rates) / max(len(rates), 1), "steps": len(rates),
                            "precision": "bf16" if '"precision": "bf16"' in done.stderr else "no"}
    return result


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def _row(name: str, world: dict[str, Any], top: dict[str, Any], base: dict[str, Any] | None) -> str:
    if "error" in world:
        return f"{name:<34} failed: {world['error']}"
    frac = fraction_of_ceiling(world, top)
    ratio = (f"{world['interactions_per_min'] / base['interactions_per_min']:.2f}x"
             if base and "error" not in base else "-")
    return (f"{name:<34} {world['interactions']:>4} {world['seconds']:>8.1f} {world['interactions_per_min']:>9.2f}"
            f" {world['tokens_per_s']:>8.1f} {world['generated_per_s']:>8.1f} {frac:>8.1%} {ratio:>7}")


def _print_training(figures: dict[str, Any], top: dict[str, Any]) -> None:
    """A training step costs about three forwards (forward, and a backward of two matrix products each):
    the ceiling is a third of the prefill rate at the step's precision."""
    print("\ntraining (our trainer, 4 groups of 3 responses a step, max length 256; ceiling = prefill rate / 3):")
    ceilings = {"float32": top["prefill_float32_tokens_per_s"] / 3, "bf16": top["prefill_tokens_per_s"] / 3}
    for name, got in figures.items():
        if "error" in got:
            print(f"  {name:<8} failed: {got['error']}")
            continue
        ratio = got["tokens_per_s"] / figures["float32"]["tokens_per_s"] if "error" not in figures["float32"] else 0
        print(f"  {name:<8} {got['tokens_per_s']:7.1f} tokens/s ({got['precision']}), {ratio:.2f}x float32, "
              f"{got['tokens_per_s'] / ceilings[name]:.0%} of its ceiling {ceilings[name]:.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sizes", default="3,8", help="grid sides, comma-separated")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--engines", action="store_true", help="our engine vs transformers' continuous batching")
    parser.add_argument("--llamacpp", action="store_true", help="the smallest world through llama.cpp's server")
    parser.add_argument("--training", action="store_true", help="our trainer, float32 and bf16, against the ceiling")
    parser.add_argument("--baseline-src", type=Path, default=None, help="a checkout to compare with")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    print(f"load average before: {_load()}  cpus: {os.cpu_count()}")
    top = ceiling(args.model)
    print(f"ceiling ({top['threads']} threads, context {top['context']}): prefill "
          f"{top['prefill_tokens_per_s']:.0f} tokens/s ({top['prefill_dtype']}; float32 "
          f"{top['prefill_float32_tokens_per_s']:.0f}); decode (float32) "
          + ", ".join(f"{rows} rows {tps:.0f}" for rows, tps in top["decode_tokens_per_s"].items()) + " tokens/s")
    report: dict[str, Any] = {"ceiling": top, "worlds": {}, "baseline": {}}
    hf = ["--backend", "hf", "--model", args.model]
    for size in sizes:
        report["worlds"][size] = run_world(size, args.rounds, backend=hf)
        if args.baseline_src:
            report["baseline"][size] = run_world(size, args.rounds, backend=hf, src=args.baseline_src)
    if args.llamacpp:
        report["llamacpp"] = llamacpp_world(args.model, min(sizes), args.rounds)
    if args.engines:
        report["engines"] = engines(args.model)
    if args.training:
        report["training"] = training(args.model)
    print(f"\n{'world':<34} {'rec':>4} {'seconds':>8} {'inter/min':>9} {'tok/s':>8} {'gen/s':>8} "
          f"{'ceiling':>8} {'vs base':>7}")
    for size in sizes:
        base = report["baseline"].get(size)
        print(_row(f"{size}x{size}x{args.rounds} hf (this code)", report["worlds"][size], top, base))
        if base:
            print(_row(f"{size}x{size}x{args.rounds} hf (baseline)", base, top, None))
    if "llamacpp" in report:
        print(_row(f"{min(sizes)}x{min(sizes)}x{args.rounds} llama.cpp server", report["llamacpp"], top, None))
    print("\ntokens per interaction by step (prompt / generated), as the backends reported them:")
    for size in sizes:
        world = report["worlds"][size]
        if "error" not in world:
            print(f"  {size}x{size}: " + "; ".join(f"{step} {v.get('prompt', 0):.0f} / {v.get('completion', 0):.0f}"
                                                 for step, v in world["by_step"].items()))
    if "engines" in report:
        print("\nengines, 32 greedy chat requests of 64 new tokens at most:")
        for name, figures in report["engines"].items():
            print(f"  {name:<16} " + (f"failed: {figures['error']}" if "error" in figures else
                                     f"{figures['tokens']} tokens in {figures['seconds']:.1f} s = "
                                     f"{figures['tokens_per_s']:.1f} tokens/s"))
    if "training" in report:
        _print_training(report["training"], top)
    print(f"\nload average after: {_load()}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
