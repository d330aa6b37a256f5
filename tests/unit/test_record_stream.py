"""The readers' trust rule (stablealign/sandbox/record_stream.py), one message at a time, without a server.

What a user relies on: a forged or broken message on ``sandbox.records.<world>`` never becomes a
record of that world (export, training data, resume), never fails the read, and is reported in one
line that says how many of each kind were skipped and where.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stablealign.core.errors import ValidationError
from stablealign.sandbox.record_stream import EXAMPLES_PER_KIND, TrustedRecords
from stablealign.sandbox.records import record_msg_id, record_to_json, validate_record
from stablealign.v1 import common_pb2

WORLD = "w1"


def record(agent: int = 3, round_: int = 0, world: str = WORLD, answer: str = "a kind answer",
           score: int | None = 5) -> common_pb2.InteractionRecord:
    rec = common_pb2.InteractionRecord(world_id=world, round=round_, agent_id=agent, question="q?",
                                       draft_answer="draft", revised_answer=answer)
    rec.feedback.add(partner_id=1, text="Rating: 5 ### Reason: fine", reason="fine", rating=5)
    if score is not None:
        rec.alignment_before.score = score
    return rec


def admit(trusted: TrustedRecords, seq: int, rec: common_pb2.InteractionRecord | bytes, msg_id: str | None = "auto"):
    data = rec if isinstance(rec, bytes) else rec.SerializeToString()
    if msg_id == "auto":
        msg_id = None if isinstance(rec, bytes) else record_msg_id(rec.world_id, rec.round, rec.agent_id)
    return trusted.admit(seq, data, msg_id)


def test_keeps_the_record_with_the_worlds_message_id_and_skips_every_forgery():
    trusted = TrustedRecords(WORLD, size=3, rounds=2)
    assert admit(trusted, 1, record(3)) is not None
    assert admit(trusted, 2, record(3, answer="FORGED"), msg_id="evil-1") is None  # a new id for a real pair
    assert admit(trusted, 3, record(4, answer="FORGED"), msg_id=None) is None  # no message id
    assert admit(trusted, 4, b"\xff\xfe not a record") is None  # not protobuf
    assert admit(trusted, 5, record(5, world="w2")) is None  # another world's payload on w1's subject
    assert admit(trusted, 6, record(9)) is None  # agent outside the 3x3 grid, with a well-formed id
    assert admit(trusted, 7, record(2, round_=2)) is None  # round outside the world's 2 rounds
    assert admit(trusted, 8, record(6, score=99)) is None  # rating outside 1..7
    assert admit(trusted, 9, record(3, answer="FORGED")) is None  # the world's id again, later: a duplicate
    kept = admit(trusted, 10, record(4))
    assert kept is not None and kept.revised_answer == "a kind answer" and kept.agent_id == 4

    stats = trusted.stats
    assert (stats.messages, stats.kept) == (10, 2)
    assert stats.as_dict()["skipped"] == {"malformed": 2, "foreign": 5, "duplicate": 1}
    line = stats.summary()
    assert line.startswith("skipped 8 of 10 messages on sandbox.records.w1: 2 malformed (seq 4: not a record; seq 8: ")
    assert "5 foreign (seq 2: message id 'evil-1', expected 'w1.0.3'; seq 3: no message id" in line
    assert "; ...)" in line  # 5 foreign, 3 shown
    assert line.endswith("1 duplicate (seq 9: round 0 agent 3)")


def test_a_broken_message_with_the_right_id_does_not_block_the_real_record_after_it():
    """Validation comes before the duplicate check: the first *valid* record with the id is kept."""
    trusted = TrustedRecords(WORLD)
    assert admit(trusted, 1, record(3, score=-4)) is None
    assert admit(trusted, 2, record(3)) is not None
    assert trusted.stats.skipped["malformed"] == 1 and trusted.stats.kept == 1


def test_without_the_spec_only_the_id_and_the_record_are_checked():
    trusted = TrustedRecords(WORLD)
    assert admit(trusted, 1, record(400, round_=9)) is not None
    assert admit(trusted, 2, record(-1)) is None  # never a real agent id
    assert trusted.stats.summary() is None or "agent -1 outside" in trusted.stats.summary()


def test_examples_stay_bounded_under_a_flood():
    trusted = TrustedRecords(WORLD)
    for seq in range(1, 5001):
        trusted.admit(seq, b"\x00junk", None)
    assert trusted.stats.skipped["malformed"] == 5000
    assert len(trusted.stats.examples["malformed"]) == EXAMPLES_PER_KIND
    assert trusted.stats.summary().startswith("skipped 5000 of 5000 messages")


def test_nothing_skipped_says_nothing():
    trusted = TrustedRecords(WORLD, size=2, rounds=1)
    for agent in range(4):
        assert admit(trusted, agent + 1, record(agent)) is not None
    assert trusted.stats.summary() is None
    assert trusted.stats.as_dict()["skipped"] == {"malformed": 0, "foreign": 0, "duplicate": 0}


def test_fields_a_records_file_would_reject_are_malformed():
    """Whatever ``data build --records`` rejects in an exported line is skipped before it is written."""
    trusted = TrustedRecords(WORLD)
    bad = [record(1), record(2), record(3), record(4), record(5)]
    bad[0].feedback[0].partner_id = -2
    bad[1].prompt_tokens = -1
    bad[2].created_at = float("nan")
    bad[3].latency_seconds["draft"] = float("inf")
    bad[4].feedback[0].expected = 9.5
    for seq, rec in enumerate(bad, 1):
        assert admit(trusted, seq, rec) is None
        with pytest.raises(ValidationError):
            validate_record(record_to_json(rec))
    assert trusted.stats.skipped["malformed"] == 5


ratings = st.one_of(st.none(), st.integers(-10, 12))
numbers = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def records(draw) -> common_pb2.InteractionRecord:
    rec = common_pb2.InteractionRecord(world_id=WORLD, round=draw(st.integers(-2, 3)), agent_id=draw(st.integers(-2, 10)),
                                       question=draw(st.text(max_size=20)), draft_answer="d", revised_answer="r",
                                       created_at=draw(numbers), prompt_tokens=draw(st.integers(-5, 5)))
    for _ in range(draw(st.integers(0, 3))):
        fb = rec.feedback.add(partner_id=draw(st.integers(-2, 10)), reason="x")
        if (value := draw(ratings)) is not None:
            fb.rating = value
        if draw(st.booleans()):
            fb.expected = draw(numbers)
    for field in ("alignment_before", "alignment_after", "engagement_before", "engagement_after"):
        if (value := draw(ratings)) is not None:
            getattr(rec, field).score = value
    if draw(st.booleans()):
        rec.latency_seconds["draft"] = draw(numbers)
    return rec


@settings(max_examples=300, deadline=None)
@given(rec=records())
def test_a_kept_record_is_one_a_records_file_accepts(rec):
    """The stream rule and the file rule agree: a record kept here passes ``validate_record``."""
    trusted = TrustedRecords(WORLD, size=3, rounds=2)
    kept = trusted.admit(1, rec.SerializeToString(), record_msg_id(WORLD, rec.round, rec.agent_id))
    if kept is not None:
        validate_record(record_to_json(kept))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), msg_id=st.one_of(st.none(), st.text(max_size=40)))
def test_any_bytes_and_any_id_are_kept_or_counted_never_raised(data, msg_id):
    trusted = TrustedRecords(WORLD, size=3, rounds=2)
    kept = trusted.admit(1, data, msg_id)
    assert trusted.stats.kept + trusted.stats.skipped_total == 1
    if kept is not None:
        assert kept.world_id == WORLD and msg_id == record_msg_id(WORLD, kept.round, kept.agent_id)
        assert 0 <= kept.agent_id < 9 and 0 <= kept.round < 2
