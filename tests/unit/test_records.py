"""Records keep the original's JSON field names; missing ratings are null, never a sentinel."""

from __future__ import annotations

import json

import pytest

from stablealign.core.errors import ValidationError
from stablealign.sandbox.records import (
    ORIGINAL_KEYS,
    read_jsonl,
    record_from_json,
    record_to_json,
    stable_view,
)
from stablealign.v1 import common_pb2


def make_record() -> common_pb2.InteractionRecord:
    record = common_pb2.InteractionRecord(
        world_id="w1", round=1, agent_id=4, label=common_pb2.PERSONA_BAD, question="q?", draft_answer="d",
        revised_answer="r", alignment_before=common_pb2.Rating(score=2, reason="rude"),
        alignment_after=common_pb2.Rating(reason="unparsable"), engagement_before=common_pb2.Rating(score=5),
        engagement_after=common_pb2.Rating(score=6), created_at=123.0)
    record.feedback.add(partner_id=1, rating=3, reason="harmful", text="Rating: 3 ### Reason: harmful")
    record.feedback.add(partner_id=7, text="garbage")
    record.latency_seconds["total"] = 0.5
    return record


def test_original_field_names_and_missing_as_null():
    row = record_to_json(make_record())
    assert list(row)[: len(ORIGINAL_KEYS)] == list(ORIGINAL_KEYS)
    assert row["label"] == "bad" and row["iteration"] == 1
    assert row["target_id"] == [1, 7] and row["rating"] == [3, None]
    assert row["gen_moral_score_before"] == 2 and row["gen_moral_score_after"] is None
    assert "latency_seconds" not in stable_view(row) and "created_at" not in stable_view(row)


def test_round_trip():
    row = record_to_json(make_record())
    assert record_to_json(record_from_json(json.loads(json.dumps(row)))) == row


def test_malformed_lines_name_file_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"agent_id": 1}\n\n{not json\n')
    rows = read_jsonl(path)
    assert next(rows) == {"agent_id": 1}
    with pytest.raises(ValidationError, match=r"records.jsonl:3: invalid JSON"):
        next(rows)
    with pytest.raises(ValidationError, match="lacks question"):
        record_from_json({"agent_id": 1, "draft_answer": "", "revised_answer": ""})


def test_feedback_holds_reasons_raw_text_kept_models_are_plain_names():
    record = make_record()
    record.agent_model.CopyFrom(common_pb2.ModelRef(backend="hf", model="/srv/models/smollm2-135m-instruct/"))
    record.observer_model.CopyFrom(common_pb2.ModelRef(backend="openai", model="smollm2"))
    record.feedback[0].expected = 2.75
    record.feedback[0].probabilities.extend([0.1, 0.2, 0.4, 0.2, 0.05, 0.03, 0.02])
    record.alignment_before.expected = 2.5
    row = record_to_json(record)
    assert row["feedback"] == ["harmful", ""]  # the partners' reasons, as in the original
    assert row["feedback_raw"] == ["Rating: 3 ### Reason: harmful", "garbage"]
    assert row["rating_expected"] == [2.75, None]
    assert row["gen_moral_expected_before"] == 2.5 and row["gen_moral_expected_after"] is None
    assert (row["agent_model"], row["agent_backend"]) == ("smollm2-135m-instruct", "hf")
    assert (row["observer_model"], row["observer_backend"]) == ("smollm2", "openai")
    assert record_to_json(record_from_json(json.loads(json.dumps(row)))) == row


def test_older_rows_still_read():
    """Our rows before feedback_raw (raw text in feedback, reasons in feedback_reasons, model dicts) and
    the original's (reasons in feedback) read back with reasons and raw text in their places."""
    ours = {"agent_id": 1, "question": "q", "draft_answer": "d", "revised_answer": "r",
            "feedback": ["Rating: 2 ### Reason: mean"], "feedback_reasons": ["mean"], "rating": [2],
            "agent_model": {"backend": "offline", "model": "offline-deterministic"}}
    record = record_from_json(ours)
    assert (record.feedback[0].text, record.feedback[0].reason) == ("Rating: 2 ### Reason: mean", "mean")
    assert (record.agent_model.backend, record.agent_model.model) == ("offline", "offline-deterministic")
    original = {"agent_id": 1, "question": "q", "draft_answer": "d", "revised_answer": "r",
                "feedback": ["too blunt"], "rating": [4]}
    assert record_from_json(original).feedback[0].reason == "too blunt"
