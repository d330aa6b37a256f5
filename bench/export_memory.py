"""Peak memory of reading a world's records back: ``stable-align export`` on a stream of N records.

    python -m bench.export_memory [--agents 10000] [--records FILE] [--forged 0] [--baseline-src DIR]
                                  [--json FILE]

Why: ``stable-align run`` at 100,489 agents held 1.76 GB while it read the records back to write
``records.jsonl`` (docs/benchmarks.md, scale table). This benchmark isolates that step. It starts a nats-server
with JetStream, publishes N interaction records of one world to ``sandbox.records.<world>`` exactly
as the world service does (protobuf, ``Nats-Msg-Id: <world>.<round>.<agent>``), optionally adds
``--forged`` forged messages, then runs ``stable-align export WORLD --out FILE --nats URL`` as its own
process and reports that process's peak RSS, its wall time, the file's size and how many lines it
wrote. The peak is the kernel's high-water mark of the export's own address space (``VmHWM``, read by
the process itself as it exits: no sampling gap). Not ``wait4``'s ``ru_maxrss``: that one keeps the
RSS the child had as a fork of this process before ``exec``, i.e. this process's own memory.

``--baseline-src DIR`` (e.g. ``git archive <rev> | tar -x -C DIR`` plus the generated
``stablealign/v1/*_pb2*.py``) runs the same export with that source tree too, on the same stream.

The records are the rows of ``--records FILE`` (a real ``records.jsonl``, re-numbered to N agents) or,
without it, a template record with the field sizes of an offline-backend world (about 3.7 KB of JSON:
four partners' feedback, four observer reasons, retrieved memories) repeated with distinct agent ids.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from services.trainer import streams as trainer_streams
from services.world import streams as world_streams
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.sandbox.records import read_records, record_from_json, record_msg_id
from stablealign.v1 import common_pb2
from stablealign_app.natsserver import EmbeddedNatsServer

WORLD_ID = "bench-export"


def template_row() -> dict:
    """One record with the field sizes of an offline-backend world (see the module docstring)."""
    reason = "The answer is socially aligned (neutral: no risk or safety cues); lexicon score +4.0 from a base of 4."
    answer = ("I don't know what that means. I think I would be uncomfortable if you wanted to ruin me, but maybe "
              "that is just me. Does that mean you think I am weak? ") * 2
    return {
        "agent_id": 0, "label": "good", "iteration": 0, "world_id": WORLD_ID, "round": 0,
        "question": "Asking for a friend. What is ecstasy?", "draft_answer": answer, "revised_answer": answer,
        "target_id": [1, 2, 3, 4], "feedback": [reason] * 4, "feedback_raw": [f"Rating: 6 ### Reason: {reason}"] * 4,
        "rating": [6, 4, 6, 6], "rating_expected": [None] * 4,
        **{f"gen_{a}_score_{s}": 4 for a in ("moral", "engagement") for s in ("before", "after")},
        **{f"gen_{a}_reason_{s}": reason for a in ("moral", "engagement") for s in ("before", "after")},
        "memories": [{"question": "How do I stay safe online?", "answer": answer, "similarity": 0.71}] * 4,
        "agent_model": "offline", "agent_backend": "offline", "observer_model": "offline",
        "observer_backend": "offline", "prompt_tokens": 812, "completion_tokens": 240,
        "latency_seconds": {"draft": 0.01, "feedback": 0.02, "revise": 0.01, "rate": 0.01}, "created_at": 1.0,
    }


def records(agents: int, source: Path | None) -> Iterator[common_pb2.InteractionRecord]:
    """N records, made one at a time (this process stays small); rows of ``source`` re-used in turn."""
    agent = 0
    while agent < agents:
        for row in (read_records(source) if source else [template_row()]):
            if agent >= agents:
                return
            record = record_from_json(row)
            record.world_id, record.round, record.agent_id = WORLD_ID, 0, agent
            yield record
            agent += 1


async def publish(url: str, items: Iterator[common_pb2.InteractionRecord], forged: int) -> None:
    nc = await nats_client.connect(url, name="bench-export")
    try:
        js = nc.jetstream(timeout=30.0)
        await world_streams.declare_streams(js)
        await trainer_streams.declare_streams(js)
        subject = subjects.RECORDS_SUBJECT.format(world_id=WORLD_ID)
        first = None
        while chunk := list(itertools.islice(items, 500)):
            first = first or chunk[0]
            await asyncio.gather(*(
                js.publish(subject, r.SerializeToString(),
                           headers={subjects.MSG_ID_HEADER: record_msg_id(r.world_id, r.round, r.agent_id)})
                for r in chunk))
        for i in range(forged):  # a new message id reusing a real (round, agent), then junk bytes
            await js.publish(subject, first.SerializeToString(), headers={subjects.MSG_ID_HEADER: f"f{i}"})
            await js.publish(subject, b"\xff not a record")
    finally:
        await nc.close()


# Runs the CLI in the child and, as it exits, writes the child's own VmHWM (kB) to the file in argv[1].
LAUNCHER = """
import atexit, sys
def hwm(path=sys.argv[1]):
    kb = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:'))
    open(path, 'w').write(kb)
atexit.register(hwm)
sys.argv = ['stable-align', *sys.argv[2:]]
from stablealign_app.cli.main import main
main()
"""


def export(url: str, out: Path, src: Path | None = None) -> dict:
    """``stable-align export`` as its own process (from ``src`` if given); its peak RSS (VmHWM)."""
    hwm = out.with_suffix(".hwm")
    env = {**os.environ, "PYTHONPATH": str(src)} if src else None
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(hwm), "export", WORLD_ID, "--out", str(out),
                           "--nats", url], capture_output=True, text=True, env=env, cwd=src or None)
    wall = time.perf_counter() - started
    if proc.returncode:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300],
                "peak_rss_mb": round(int(hwm.read_text()) / 1024, 1) if hwm.exists() else None}
    with open(out, encoding="utf-8") as handle:
        lines = sum(1 for _ in handle)
    return {"ok": True, "peak_rss_mb": round(int(hwm.read_text()) / 1024, 1), "wall_seconds": round(wall, 2),
            "lines": lines, "file_mb": round(out.stat().st_size / 2**20, 1), "stderr": proc.stderr.strip()[-600:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--records", type=Path, default=None, help="a records.jsonl whose rows are re-used")
    parser.add_argument("--forged", type=int, default=0, help="pairs of forged messages to add")
    parser.add_argument("--baseline-src", type=Path, default=None, help="an older source tree to run too")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNatsServer() as server:
        asyncio.run(publish(server.url, records(args.agents, args.records), args.forged))
        for name, src in (("baseline", args.baseline_src), ("now", None)):
            if name == "baseline" and src is None:
                continue
            result = {"code": name, "agents": args.agents, "forged": 2 * args.forged,
                      **export(server.url, Path(tmp) / f"{name}.jsonl", src)}
            results.append(result)
            if result["ok"]:
                print(f"{name}: export of {args.agents:,} records (+{2 * args.forged} forged): peak RSS "
                      f"{result['peak_rss_mb']} MB, {result['wall_seconds']} s, {result['lines']:,} lines, "
                      f"{result['file_mb']} MB")
                if result["stderr"]:
                    print("  " + result["stderr"].replace("\n", "\n  "))
            else:
                print(f"{name}: export of {args.agents:,} records (+{2 * args.forged} forged) FAILED: {result['error']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
