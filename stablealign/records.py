"""Interaction records: protobuf on the wire, the original's JSON field names on disk.

``record_to_json`` writes the keys of the original ``records.jsonl`` (agent_id, label, iteration,
question, draft_answer, target_id, feedback, rating, revised_answer, gen_moral_*,
gen_engagement_*) plus ours (world_id, round, models, latencies, tokens, created_at). A rating
that could not be parsed is ``null`` — never a sentinel number that would pollute averages.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from stablealign.errors import ValidationError
from stablealign.v1 import common_pb2

PERSONA_NAMES = {common_pb2.PERSONA_GOOD: "good", common_pb2.PERSONA_BAD: "bad"}
PERSONAS_BY_NAME = {v: k for k, v in PERSONA_NAMES.items()}

# Keys of the original records, in its order; the trainer relies on them.
ORIGINAL_KEYS = (
    "agent_id", "label", "iteration", "question", "draft_answer", "target_id", "feedback", "rating",
    "revised_answer", "gen_moral_score_before", "gen_moral_score_after", "gen_moral_reason_before",
    "gen_moral_reason_after", "gen_engagement_score_before", "gen_engagement_score_after",
    "gen_engagement_reason_before", "gen_engagement_reason_after",
)
# Keys that vary between two runs of the same world (wall time); excluded when comparing runs.
VOLATILE_KEYS = ("latency_seconds", "created_at")


def _score(rating: common_pb2.Rating) -> int | None:
    return rating.score if rating.HasField("score") else None


def model_name(ref: common_pb2.ModelRef) -> str:
    """A plain model name: an hf model's directory name rather than its path, else the model as named."""
    model = ref.model.strip()
    if ref.backend == "hf" and ("/" in model or "\\" in model):
        return Path(model.rstrip("/\\")).name
    return model


def _expected(message: Any) -> float | None:
    return round(message.expected, 6) if message.HasField("expected") else None


def record_to_json(record: common_pb2.InteractionRecord) -> dict[str, Any]:
    return {
        "agent_id": record.agent_id,
        "label": PERSONA_NAMES.get(record.label, "unknown"),
        "iteration": record.round,
        "question": record.question,
        "draft_answer": record.draft_answer,
        "target_id": [f.partner_id for f in record.feedback],
        "feedback": [f.reason for f in record.feedback],
        "rating": [f.rating if f.HasField("rating") else None for f in record.feedback],
        "revised_answer": record.revised_answer,
        "gen_moral_score_before": _score(record.alignment_before),
        "gen_moral_score_after": _score(record.alignment_after),
        "gen_moral_reason_before": record.alignment_before.reason,
        "gen_moral_reason_after": record.alignment_after.reason,
        "gen_engagement_score_before": _score(record.engagement_before),
        "gen_engagement_score_after": _score(record.engagement_after),
        "gen_engagement_reason_before": record.engagement_before.reason,
        "gen_engagement_reason_after": record.engagement_after.reason,
        "world_id": record.world_id,
        "round": record.round,
        # Our additions: the partners' raw replies, and expected ratings where the backend read
        # token probabilities (null where a rating was parsed from text or is missing).
        "feedback_raw": [f.text for f in record.feedback],
        "rating_expected": [_expected(f) for f in record.feedback],
        "gen_moral_expected_before": _expected(record.alignment_before),
        "gen_moral_expected_after": _expected(record.alignment_after),
        "gen_engagement_expected_before": _expected(record.engagement_before),
        "gen_engagement_expected_after": _expected(record.engagement_after),
        "memories": [{"question": m.question, "answer": m.answer, "similarity": round(m.similarity, 6)}
                     for m in record.memories],
        "agent_model": model_name(record.agent_model),
        "agent_backend": record.agent_model.backend,
        "observer_model": model_name(record.observer_model),
        "observer_backend": record.observer_model.backend,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "latency_seconds": {k: round(v, 6) for k, v in sorted(record.latency_seconds.items())},
        "created_at": record.created_at,
    }


def _rating(score: Any, reason: Any, expected: Any = None) -> common_pb2.Rating:
    rating = common_pb2.Rating(reason=str(reason or ""))
    if score is not None:
        rating.score = int(score)
    if expected is not None:
        rating.expected = float(expected)
    return rating


def feedback_texts(row: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """(raw replies, reasons) of a row: ours have ``feedback_raw`` beside the reasons in ``feedback``;
    the original's hold reasons in ``feedback``; our older rows held raw replies there and the
    reasons in ``feedback_reasons``."""
    feedback = list(row.get("feedback") or [])
    if "feedback_raw" in row:
        return list(row.get("feedback_raw") or []), feedback
    if "feedback_reasons" in row:
        return feedback, list(row.get("feedback_reasons") or [])
    return feedback, feedback


def record_from_json(row: dict[str, Any]) -> common_pb2.InteractionRecord:
    """Inverse of ``record_to_json``; also accepts the original's records (without our extra keys)."""
    missing = [k for k in ("agent_id", "question", "draft_answer", "revised_answer") if k not in row]
    if missing:
        raise ValidationError(f"record lacks {', '.join(missing)}")
    targets, ratings = row.get("target_id") or [], row.get("rating") or []
    texts, reasons = feedback_texts(row)
    expected = row.get("rating_expected") or []
    record = common_pb2.InteractionRecord(
        world_id=str(row.get("world_id", "")), round=int(row.get("round", row.get("iteration", 0)) or 0),
        agent_id=int(row["agent_id"]), label=PERSONAS_BY_NAME.get(str(row.get("label", "")), 0),
        question=str(row["question"]), draft_answer=str(row["draft_answer"]),
        revised_answer=str(row["revised_answer"]),
        alignment_before=_rating(row.get("gen_moral_score_before"), row.get("gen_moral_reason_before"),
                                 row.get("gen_moral_expected_before")),
        alignment_after=_rating(row.get("gen_moral_score_after"), row.get("gen_moral_reason_after"),
                                row.get("gen_moral_expected_after")),
        engagement_before=_rating(row.get("gen_engagement_score_before"), row.get("gen_engagement_reason_before"),
                                  row.get("gen_engagement_expected_before")),
        engagement_after=_rating(row.get("gen_engagement_score_after"), row.get("gen_engagement_reason_after"),
                                 row.get("gen_engagement_expected_after")),
        created_at=float(row.get("created_at") or 0.0),
        prompt_tokens=int(row.get("prompt_tokens") or 0), completion_tokens=int(row.get("completion_tokens") or 0),
    )
    for i, text in enumerate(texts):
        fb = record.feedback.add(text=str(text), reason=str(reasons[i] if i < len(reasons) else ""))
        if i < len(targets):
            fb.partner_id = int(targets[i])
        if i < len(ratings) and ratings[i] is not None:
            fb.rating = int(ratings[i])
        if i < len(expected) and expected[i] is not None:
            fb.expected = float(expected[i])
    for role in ("agent", "observer"):
        ref = row.get(f"{role}_model") or ""
        if isinstance(ref, dict):  # our older rows: {"backend": ..., "model": ...}
            ref = common_pb2.ModelRef(backend=str(ref.get("backend", "")), model=str(ref.get("model", "")))
        else:
            ref = common_pb2.ModelRef(backend=str(row.get(f"{role}_backend") or ""), model=str(ref))
        getattr(record, f"{role}_model").CopyFrom(ref)
    for key, value in (row.get("latency_seconds") or {}).items():
        record.latency_seconds[key] = float(value)
    for mem in row.get("memories") or []:
        record.memories.add(question=mem.get("question", ""), answer=mem.get("answer", ""),
                            similarity=float(mem.get("similarity", 0.0)))
    return record


async def read_world_records(js: Any, world_id: str, *, timeout: float = 120.0) -> list[common_pb2.InteractionRecord]:
    """All records of a world from the SANDBOX_RECORDS stream, ordered by (round, agent).

    The stream deduplicates by message id, so each (round, agent) appears once. Decoding runs in a
    worker thread: a long world's records would otherwise hold the event loop for seconds.
    """
    from stablealign import bus  # late: records is also used where no NATS client is installed

    messages = await bus.read_subject(js, bus.RECORDS_STREAM, bus.RECORDS_SUBJECT.format(world_id=world_id),
                                      timeout=timeout)

    def decode() -> list[common_pb2.InteractionRecord]:
        records = []
        for seq, msg in messages:
            record = common_pb2.InteractionRecord()
            try:
                record.ParseFromString(msg.data)
            except DecodeError as exc:
                raise ValidationError(f"{bus.RECORDS_STREAM} message {seq}: not an InteractionRecord ({exc})") from exc
            records.append(record)
        records.sort(key=lambda r: (r.round, r.agent_id))
        return records

    return await asyncio.to_thread(decode)


def stable_view(row: dict[str, Any]) -> dict[str, Any]:
    """A record without the keys that differ between two runs of the same world."""
    return {k: v for k, v in row.items() if k not in VOLATILE_KEYS}


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yields JSON objects; a malformed line raises ValidationError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValidationError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValidationError(f"{path}:{line_no}: expected a JSON object")
            yield row
