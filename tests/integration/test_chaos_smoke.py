"""Two rows of the chaos suite (bench/chaos.py, `make chaos`) on a 3×3×1 world, so `make test` keeps it honest.

Real processes on loopback: nats-server, `stable-align serve` agent ×2, observer, world, an OpenAI-protocol
devserver, `stable-align run --nats`. Each row must end COMPLETED with exactly 9 records - counted by an
independent nats-py reader of the SANDBOX_RECORDS stream and in records.jsonl - and none duplicated.
"""

from __future__ import annotations

import asyncio

import pytest

from bench import chaos

pytestmark = pytest.mark.timeout(150)


@pytest.mark.parametrize("key", ["agent-kill", "llm-30"])
def test_chaos_row_ends_with_exactly_size2_x_rounds_records(key, tmp_path):
    try:
        row = asyncio.run(asyncio.wait_for(
            chaos.world_row(key, size=3, rounds=1, trigger=0.4, timeout=100, workdir=tmp_path), timeout=130))
    finally:
        chaos._kill_all_live()
    assert (row.got, row.distinct, row.duplicated, row.jsonl, row.state) == (9, 9, 0, 9, "COMPLETED"), row
    assert row.ok and row.recovery_s is not None, row
    assert "fault at 0 records" in row.note or "fault at" in row.note
