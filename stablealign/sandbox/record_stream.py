"""Reading a world's records back from the SANDBOX_RECORDS stream: what is trusted, and in bounded memory.

**The trust rule** — the one place it is written; ``stable-align export``, ``run`` (records.jsonl),
``data build --nats``, ``watch``, the world service's resume and its StreamInteractions all read
through :class:`TrustedRecords`. A message on ``sandbox.records.<W>`` becomes the record of
(W, round, agent) only when, in this order:

1. it decodes as an ``InteractionRecord`` that names a world — else **malformed** (``not a record``);
2. its payload's ``world_id`` is W (the subject's world), its ``Nats-Msg-Id`` header is exactly
   ``record_msg_id(W, round, agent)`` of its own payload (the id the world service publishes with),
   and, where the reader knows the world's spec, ``agent < size²`` and ``round < rounds`` — else
   **foreign**;
3. it passes the checks a records file gets (``check_stream_record``: what ``validate_record`` checks
   in a JSON row that a protobuf field can get wrong — ratings 1–7, ids and counts >= 0, finite
   numbers) — else **malformed**, so ``export`` never writes a line that ``data build --records``
   would then reject (a property test holds the two together);
4. no earlier message was kept for the same (round, agent) — else **duplicate**. The first wins: the
   world publishes a record once, after which JetStream drops anything carrying the same id for
   its duplicate window; a later copy is a re-publication, never the original.

Skipped messages are counted, never fatal: one non-protobuf message used to make ``export`` and
``data build`` of the whole world fail, and a forged record under a new message id reusing a real
(round, agent) was exported, trained on, and made resume skip that agent's real interaction.
Readers say what they skipped in one line (:meth:`ReadStats.summary`), e.g.
``skipped 4 of 52 messages on sandbox.records.w1: 1 malformed (seq 17: not a record), 2 foreign
(seq 30: no message id; seq 41: message id 'x', expected 'w1.0.3'), 1 duplicate (seq 44: round 0
agent 3)``.

What the rule cannot catch: a message forged *with the world's own id* for a (round, agent) the
world has not published yet is indistinguishable from the real one (and JetStream would then drop
the real one as a re-send). Only publish permissions close that: the world's NATS user alone may
publish ``sandbox.records.>`` (issue 10, NATS security).

**Bounded memory.** Messages are read with batched direct gets (no consumer: issue 19), a batch at a time,
up to the subject's last sequence at the start (a bounded read even while the world keeps publishing) and
checked in a worker thread (the event loop stays free). The reader keeps only the set of (round, agent) keys it has
kept; ``export_world_records`` writes each row to disk as it is read and keeps a (key, offset,
length) index of 24 bytes per record, then puts the file in (round, agent) order by copying lines
in that order — the order ``records.jsonl`` has always had, which makes two runs of the same world
byte-comparable and ``data build``'s sampling independent of the order replies happened to arrive
in. Reading 100,000 records used to hold every message and every decoded record at once.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from stablealign.core.errors import ValidationError
from stablealign.core.metrics import ENTRIES_SKIPPED
from stablealign.sandbox.records import check_record, record_msg_id, record_to_json
from stablealign.sandbox.worlds import check_world_id
from stablealign.v1 import common_pb2

RECORDS_STREAM = "SANDBOX_RECORDS"  # = subjects.RECORDS_STREAM; bus is imported late (no NATS client needed here)
RECORDS_SUBJECT = "sandbox.records.{world_id}"
MSG_ID_HEADER = "Nats-Msg-Id"
SKIP_KINDS = ("malformed", "foreign", "duplicate")
EXAMPLES_PER_KIND = 3  # examples kept per kind: a flood of forged messages cannot grow the stats
BATCH = 256  # messages checked per worker-thread call
IDLE_TIMEOUT_SECONDS = 30.0  # no message for this long while the read is not done: the read fails

Raw = tuple[int, bytes, str | None]  # (stream sequence, payload, Nats-Msg-Id header)


@dataclass
class ReadStats:
    """What a read of one world's subject saw: messages, records kept, and what was skipped and why."""

    subject: str
    messages: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # kind -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind -> up to EXAMPLES_PER_KIND

    def skip(self, kind: str, example: str) -> None:
        self.skipped[kind] += 1
        if kind == "malformed":
            ENTRIES_SKIPPED.labels(RECORDS_STREAM).inc()
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES_PER_KIND:
            shown.append(example)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str | None:
        """One line for a person (stderr, a log field); None when nothing was skipped."""
        if not self.skipped_total:
            return None
        parts = []
        for kind in SKIP_KINDS:
            count = self.skipped[kind]
            if count:
                shown = "; ".join(self.examples.get(kind, []))
                more = "; ..." if count > len(self.examples.get(kind, [])) else ""
                parts.append(f"{count} {kind} ({shown}{more})")
        return f"skipped {self.skipped_total} of {self.messages} messages on {self.subject}: " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """For stats files and summaries: counts per kind (all kinds, zeros included) and the examples."""
        return {"subject": self.subject, "messages": self.messages, "kept": self.kept,
                "skipped": {kind: self.skipped[kind] for kind in SKIP_KINDS},
                "examples": {k: list(v) for k, v in self.examples.items()}}


class TrustedRecords:
    """The trust rule of the module docstring, one message at a time; remembers only kept keys.

    ``size`` and ``rounds`` (the world's spec) bound agent ids and rounds where the reader knows
    them; without them only the message id, the world and the record's own checks apply.
    """

    def __init__(self, world_id: str, *, size: int | None = None, rounds: int | None = None) -> None:
        check_world_id(world_id)  # no '.', '*' or '>': the subject names exactly one world
        self.world_id = world_id
        self.subject = RECORDS_SUBJECT.format(world_id=world_id)
        self.agents = size * size if size else None
        self.size = size
        self.rounds = rounds or None
        self.stats = ReadStats(self.subject)
        self._seen: set[int] = set()  # round << 32 | agent: ~60 bytes per kept record

    def admit(self, seq: int, data: bytes, msg_id: str | None) -> common_pb2.InteractionRecord | None:
        """The record if the message is trusted, else None (counted in ``stats``)."""
        self.stats.messages += 1
        record = common_pb2.InteractionRecord()
        try:
            record.ParseFromString(data)
        except (DecodeError, ValueError):
            self.stats.skip("malformed", f"seq {seq}: not a record")
            return None
        if not record.world_id:
            self.stats.skip("malformed", f"seq {seq}: not a record (no world id)")
            return None
        reason = self._foreign(record, msg_id)
        if reason:
            self.stats.skip("foreign", f"seq {seq}: {reason}")
            return None
        try:
            check_stream_record(record)
        except ValidationError as exc:
            self.stats.skip("malformed", f"seq {seq}: round {record.round} agent {record.agent_id}: {exc}")
            return None
        key = record.round << 32 | record.agent_id
        if key in self._seen:
            self.stats.skip("duplicate", f"seq {seq}: round {record.round} agent {record.agent_id}")
            return None
        self._seen.add(key)
        self.stats.kept += 1
        return record

    def _foreign(self, record: common_pb2.InteractionRecord, msg_id: str | None) -> str | None:
        if record.world_id != self.world_id:
            return f"world {record.world_id[:64]!r} on {self.subject}"
        expected = record_msg_id(self.world_id, record.round, record.agent_id)
        if msg_id is None:
            return f"no message id (payload round {record.round} agent {record.agent_id})"
        if msg_id != expected:
            return f"message id {msg_id[:80]!r}, expected {expected!r}"
        if record.agent_id < 0 or (self.agents is not None and record.agent_id >= self.agents):
            return f"agent {record.agent_id} outside the {self.size}x{self.size} grid"
        if record.round < 0 or (self.rounds is not None and record.round >= self.rounds):
            return f"round {record.round} outside the world's {self.rounds} rounds"
        return None

    def admit_all(self, batch: Iterable[Raw]) -> list[common_pb2.InteractionRecord]:
        return [kept for seq, data, msg_id in batch if (kept := self.admit(seq, data, msg_id)) is not None]


def check_stream_record(record: common_pb2.InteractionRecord) -> None:
    """``ValidationError`` unless the record passes what ``validate_record`` checks in its JSON row.

    Only what a protobuf field can hold wrongly is checked (types and UTF-8 it guarantees):
    ratings, expected ratings and probabilities (``check_record``), ids and token counts >= 0,
    latencies finite, ``created_at`` finite and >= 0. 75 instead of 130 us per record than building
    the row and validating it, which matters for the world's resume of a 100,000-agent world."""
    check_record(record)
    for name in ("round", "agent_id", "prompt_tokens", "completion_tokens"):
        if getattr(record, name) < 0:
            raise ValidationError(f"{name} must be >= 0, got {getattr(record, name)}")
    for i, feedback in enumerate(record.feedback):
        if feedback.partner_id < 0:
            raise ValidationError(f"target_id[{i}] must be an agent id (integer >= 0), got {feedback.partner_id}")
    if not math.isfinite(record.created_at) or record.created_at < 0:
        raise ValidationError(f"created_at {record.created_at} is not a finite number >= 0")
    for key, value in record.latency_seconds.items():
        if not math.isfinite(value):
            raise ValidationError(f"latency_seconds.{key[:40]} {value} is not a finite number")


def record_key(record: common_pb2.InteractionRecord) -> tuple[int, int]:
    return record.round, record.agent_id


# --- reading the stream ----------------------------------------------------------------------------


async def _raw_batches(js: Any, subject: str, *, idle_timeout: float, batch: int) -> AsyncIterator[list[Raw]]:
    """The subject's messages up to its last sequence at the start, ``batch`` at a time.

    Batched direct gets (``stablealign.nats.direct``), no consumer: a reader's NATS user may not create
    one (issue 19), and at most ``batch`` messages are in this process at once. The read is bounded: it
    stops at that last sequence (others may keep publishing) and fails with ``UnavailableError`` when
    nothing arrives for ``idle_timeout`` seconds before it.
    """
    from stablealign.nats import direct

    async for got in direct.read_batches(js, RECORDS_STREAM, subject, batch=batch, idle_timeout=idle_timeout):
        yield [(m.seq, m.data, m.headers.get(MSG_ID_HEADER)) for m in got]


async def read_trusted(js: Any, trusted: TrustedRecords, *, idle_timeout: float = IDLE_TIMEOUT_SECONDS,
                       batch: int = BATCH) -> AsyncIterator[common_pb2.InteractionRecord]:
    """Trusted records of ``trusted``'s world in stream order, as they are read; skips in ``trusted.stats``."""
    async for raw in _raw_batches(js, trusted.subject, idle_timeout=idle_timeout, batch=batch):
        for kept in await asyncio.to_thread(trusted.admit_all, raw):
            yield kept


async def read_world_records(js: Any, world_id: str, *, size: int | None = None, rounds: int | None = None,
                             idle_timeout: float = IDLE_TIMEOUT_SECONDS,
                             ) -> tuple[list[common_pb2.InteractionRecord], ReadStats]:
    """All trusted records of a world, ordered by (round, agent), and what was skipped.

    Holds every record: for readers that need them all at once (benchmarks, tests). Exports use
    ``export_world_records``, the world's resume ``read_trusted``.
    """
    trusted = TrustedRecords(world_id, size=size, rounds=rounds)
    records = [record async for record in read_trusted(js, trusted, idle_timeout=idle_timeout)]
    records.sort(key=record_key)
    return records, trusted.stats


async def read_world_rows(js: Any, world_id: str, *, size: int | None = None, rounds: int | None = None,
                          idle_timeout: float = IDLE_TIMEOUT_SECONDS) -> tuple[list[dict[str, Any]], ReadStats]:
    """Trusted records of a world as JSON rows (``record_to_json``), ordered by (round, agent)."""
    trusted = TrustedRecords(world_id, size=size, rounds=rounds)
    keyed = [(record_key(record), record_to_json(record))
             async for record in read_trusted(js, trusted, idle_timeout=idle_timeout)]
    keyed.sort(key=lambda item: item[0])
    return [row for _, row in keyed], trusted.stats


@dataclass
class ExportResult:
    path: Path
    records: int
    stats: ReadStats


async def export_world_records(js: Any, world_id: str, path: str | Path, *, size: int | None = None,
                               rounds: int | None = None, idle_timeout: float = IDLE_TIMEOUT_SECONDS,
                               on_row: Callable[[dict[str, Any]], None] | None = None) -> ExportResult:
    """Writes a world's trusted records to ``path`` as JSONL in (round, agent) order, in bounded memory.

    Rows go to a temporary file beside ``path`` as they are read (with a 24-byte index entry each);
    if the stream's order was not already (round, agent) the lines are then copied in that order
    to a second temporary file. ``path`` appears only once complete (``os.replace``), so a failed
    read never leaves half a records.jsonl. ``on_row`` sees each kept row once (e.g. to count
    missing ratings without reading the file again).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trusted = TrustedRecords(world_id, size=size, rounds=rounds)
    streamed = path.with_name(f".{path.name}.{os.getpid()}.stream")
    ordered = path.with_name(f".{path.name}.{os.getpid()}.ordered")
    keys, offsets, lengths = array("q"), array("q"), array("q")

    def write(handle: Any, raw: list[Raw]) -> None:  # in a worker thread: check, serialize, write
        for record in trusted.admit_all(raw):
            row = record_to_json(record)
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
            keys.append(record.round << 32 | record.agent_id)
            offsets.append(handle.tell())
            lengths.append(len(line))
            handle.write(line)
            if on_row is not None:
                on_row(row)

    try:
        handle = await asyncio.to_thread(open, streamed, "wb")
        try:
            async for raw in _raw_batches(js, trusted.subject, idle_timeout=idle_timeout, batch=BATCH):
                await asyncio.to_thread(write, handle, raw)
        finally:
            await asyncio.to_thread(handle.close)
        await asyncio.to_thread(_put_in_order, streamed, ordered, path, keys, offsets, lengths)
    finally:
        for leftover in (streamed, ordered):
            leftover.unlink(missing_ok=True)
    return ExportResult(path, len(keys), trusted.stats)


def _put_in_order(streamed: Path, ordered: Path, path: Path, keys: array, offsets: array, lengths: array) -> None:
    if all(keys[i] < keys[i + 1] for i in range(len(keys) - 1)):
        os.replace(streamed, path)
        return
    order = sorted(range(len(keys)), key=keys.__getitem__)
    with open(streamed, "rb") as source, open(ordered, "wb") as target:
        for i in order:
            source.seek(offsets[i])
            target.write(source.read(lengths[i]))
    os.replace(ordered, path)
