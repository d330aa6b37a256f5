"""Interaction records: protobuf on the wire, the original's JSON field names on disk.

``record_to_json`` writes the keys of the original ``records.jsonl`` (agent_id, label, iteration,
question, draft_answer, target_id, feedback, rating, revised_answer, gen_moral_*,
gen_engagement_*) plus ours (world_id, round, models, latencies, tokens, created_at). A rating
that could not be parsed is ``null`` — never a sentinel number that would pollute averages.

Reading records files — the policy for bad input is **strict**: ``read_records`` (used by
``stable-align data build --records``, ``eval --sandbox-records`` and the pipeline) raises a
``ValidationError`` ``FILE:LINE: <reason>`` at the first bad line — bytes that are not UTF-8,
invalid JSON, a value that is not an object, a field of the wrong type (``agent_id: "x"``,
``rating: ["a"]``, ``iteration: null``), a rating outside 1..7 (``rating`` items and
``gen_*_score_*``) — and the command line prints that one line (``error: ...``, exit 2). Nothing
is skipped: a records file is the world's own output, so a bad line means a damaged or foreign
file, and dropping it silently would change what is trained on and what the curves show; the
user fixes or filters the file knowing exactly where. A missing rating (``null``) is valid.

The SANDBOX_RECORDS *stream* is read the other way (``stablealign.sandbox.record_stream``): anyone allowed
to publish there can add a message, so a reader keeps one record per (world, round, agent) — the
one carrying the world's message id — and skips and counts the rest instead of failing the world.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stablealign.core.errors import ValidationError
from stablealign.sandbox.ratings import check_rating_message, check_score, show_value
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
# Checked when a record is read from JSON (``validate_record``).
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
SCORE_KEYS = tuple(f"gen_{aspect}_score_{stage}" for aspect in ("moral", "engagement") for stage in ("before", "after"))
EXPECTED_KEYS = tuple(k.replace("_score_", "_expected_") for k in SCORE_KEYS)
REASON_KEYS = tuple(k.replace("_score_", "_reason_") for k in SCORE_KEYS)
REQUIRED_TEXT_KEYS = ("question", "draft_answer", "revised_answer")
REQUIRED_KEYS = ("agent_id", *REQUIRED_TEXT_KEYS)


def record_msg_id(world_id: str, round_: int, agent: int) -> str:
    """The ``Nats-Msg-Id`` of a record (DESIGN §3): JetStream drops a re-sent record carrying it, and
    readers keep only the record that carries it (``stablealign.sandbox.record_stream``)."""
    return f"{world_id}.{round_}.{agent}"


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


def check_record(record: common_pb2.InteractionRecord) -> common_pb2.InteractionRecord:
    """The rating fields of a record built from other services' replies, before it is published:
    ratings 1..7, expected ratings finite in [1, 7], P(1..7) summing to 1 (``check_rating_message``);
    ``ValidationError`` naming the field otherwise, so that a bad reply never becomes a record."""
    for i, feedback in enumerate(record.feedback):
        check_rating_message(feedback, f"feedback[{i}] (partner {feedback.partner_id})")
    for field in ("alignment_before", "alignment_after", "engagement_before", "engagement_after"):
        check_rating_message(getattr(record, field), field)
    return record


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
    """Inverse of ``record_to_json``; also accepts the original's records (without our extra keys).
    The row is checked first (``validate_record``): a bad one raises ``ValidationError``."""
    validate_record(row)
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


def decode_line(raw: bytes, where: str) -> str:
    """One line's bytes as text; invalid UTF-8 is a ``ValidationError`` at ``where`` (``file:line``)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") \
            from None


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` whose every failure is one ``ValidationError`` line at ``where``: invalid JSON,
    numbers too long to convert, nesting too deep, strings holding lone surrogates (``"\\ud800"``,
    which could not be written back as UTF-8)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValidationError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ValidationError(f"{where}: invalid JSON ({str(exc).splitlines()[0]})") from None
    check_unicode(value, text, where)
    return value


def check_unicode(value: Any, text: str, where: str) -> None:
    """``ValidationError`` if a string of ``value`` (parsed from ``text``) holds a lone surrogate."""
    if "\\u" not in text.lower():  # only escapes can make a lone surrogate
        return
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{where}: a string holds a lone UTF-16 surrogate (not valid Unicode)") from None


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each non-blank line; any bad line raises ``ValidationError``
    ``FILE:LINE: <reason>``. Lines end at ``\\n`` only (U+2028 inside a string is text, not a line end);
    a UTF-8 byte order mark at the start is skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"file not found: {path}")
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            where = f"{path}:{line_no}"
            text = decode_line(raw, where)
            if text.strip():
                yield line_no, parse_json(text, where)


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yields JSON objects; a malformed line (bad UTF-8, bad JSON, not an object) raises
    ValidationError naming the file and line. Fields are not checked: see ``read_records``."""
    path = Path(path)
    for line_no, row in iter_json_lines(path):
        if not isinstance(row, dict):
            raise ValidationError(f"{path}:{line_no}: expected a JSON object, got {_json_type(row)}")
        yield row


def read_records(path: str | Path, *, required: Iterable[str] = REQUIRED_KEYS) -> Iterator[dict[str, Any]]:
    """Yields the interaction records of a records JSONL, each checked by ``validate_record`` (with
    ``required`` keys: a reader that needs only rounds and ratings may ask for none).

    Strict: the first bad line raises ``ValidationError`` ``FILE:LINE: <reason>`` (see the module
    docstring for why nothing is skipped)."""
    path = Path(path)
    for line_no, row in iter_json_lines(path):
        try:
            yield validate_record(row, required=required)
        except ValidationError as exc:
            raise ValidationError(f"{path}:{line_no}: {exc}") from None


# --- field checks of a record read from JSON ----------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _check_int(row: dict[str, Any], key: str, maximum: int = _INT32_MAX) -> None:
    if key not in row:
        return
    value = row[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        shown = show_value(value)
        raise ValidationError(f"{key} must be an integer in 0..{maximum}, got {shown}")


def _check_text(row: dict[str, Any], key: str, *, nullable: bool = True) -> None:
    value = row.get(key)
    if value is None and nullable:
        return
    if not isinstance(value, str):
        raise ValidationError(f"{key} must be a string, got {_json_type(value)}")


def _check_list(row: dict[str, Any], key: str) -> list[Any]:
    value = row.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError(f"{key} must be a list, got {_json_type(value)}")
    return value


def _check_number(value: Any, name: str, *, minimum: float | None = None, finite: bool = True) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValidationError(f"{name} must be a number, got {_json_type(value)}")
    huge = isinstance(value, int) and abs(value) > 1e300  # would overflow a float
    if huge or (finite and isinstance(value, float) and not math.isfinite(value)):
        raise ValidationError(f"{name} {show_value(value)} is not a finite number")
    if minimum is not None and value < minimum:
        raise ValidationError(f"{name} {show_value(value)} is below {minimum:g}")


def validate_record(row: Any, *, required: Iterable[str] = REQUIRED_KEYS) -> dict[str, Any]:
    """Checks the fields of one interaction record read from JSON; returns it, or raises
    ``ValidationError`` with the reason (the caller adds ``file:line``).

    Required (``required``, by default): ``agent_id`` (integer >= 0), ``question``,
    ``draft_answer``, ``revised_answer`` (strings). Where present: ``iteration`` / ``round``
    integers >= 0 (``null`` is rejected: every record belongs to a round); ratings — each item of
    ``rating`` and ``gen_{moral,engagement}_score_{before,after}`` — a number in 1..7 or ``null``
    (missing, DESIGN §3); expected ratings finite in 1..7 or ``null``; ``target_id`` integers;
    texts strings (or ``null``); models strings or ``{backend, model}``; ``latency_seconds``
    numbers; ``memories`` objects; token counts integers >= 0. Other keys pass unchecked.
    """
    if not isinstance(row, dict):
        raise ValidationError(f"expected a JSON object, got {_json_type(row)}")
    missing = [k for k in required if k not in row]
    if missing:
        raise ValidationError(f"record lacks {', '.join(missing)}")
    for key in ("agent_id", "iteration", "round"):
        _check_int(row, key)
    for key in REQUIRED_TEXT_KEYS:
        if key in row:
            _check_text(row, key, nullable=False)
    for key in ("label", "world_id", "agent_backend", "observer_backend", *REASON_KEYS):
        _check_text(row, key)
    for key in SCORE_KEYS:
        check_score(row.get(key), key)
    for key in EXPECTED_KEYS:
        check_score(row.get(key), key)
    for i, value in enumerate(_check_list(row, "rating")):
        check_score(value, f"rating[{i}]")
    for i, value in enumerate(_check_list(row, "rating_expected")):
        check_score(value, f"rating_expected[{i}]")
    for i, value in enumerate(_check_list(row, "target_id")):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _INT32_MAX:
            raise ValidationError(f"target_id[{i}] must be an agent id (integer >= 0), got {show_value(value)}")
    for key in ("feedback", "feedback_raw", "feedback_reasons"):
        for i, value in enumerate(_check_list(row, key)):
            if value is not None and not isinstance(value, str):
                raise ValidationError(f"{key}[{i}] must be a string, got {_json_type(value)}")
    for role in ("agent_model", "observer_model"):
        ref = row.get(role)
        if isinstance(ref, dict):
            for part in ("backend", "model"):
                if not isinstance(ref.get(part, ""), str):
                    raise ValidationError(f"{role}.{part} must be a string, got {_json_type(ref.get(part))}")
        elif ref is not None and not isinstance(ref, str):
            raise ValidationError(f"{role} must be a model name or {{backend, model}}, got {_json_type(ref)}")
    latency = row.get("latency_seconds")
    if latency is not None:
        if not isinstance(latency, dict):
            raise ValidationError(f"latency_seconds must be an object, got {_json_type(latency)}")
        for key, value in latency.items():
            if value is None:
                raise ValidationError(f"latency_seconds.{key} must be a number, got null")
            _check_number(value, f"latency_seconds.{key}")
    for i, mem in enumerate(_check_list(row, "memories")):
        if not isinstance(mem, dict):
            raise ValidationError(f"memories[{i}] must be an object, got {_json_type(mem)}")
        for part in ("question", "answer"):
            if not isinstance(mem.get(part, ""), str):
                raise ValidationError(f"memories[{i}].{part} must be a string, got {_json_type(mem.get(part))}")
        # informational (a zero embedding has no cosine): any number, NaN included
        _check_number(mem.get("similarity"), f"memories[{i}].similarity", finite=False)
    for key in ("prompt_tokens", "completion_tokens"):
        if row.get(key) is not None:
            _check_int(row, key, _INT64_MAX)
    _check_number(row.get("created_at"), "created_at", minimum=0)
    return row
