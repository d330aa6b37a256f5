"""The readers' trust rule (stablealign/record_stream.py), one message at a time, without a server.

What a user relies on: a forged or broken message on ``sandbox.records.<world>`` never becomes a
record of that world (export, training data, resume), never fails the read, and is reported in one
line that says how many of each kind were skipped and where.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stablealign.record_stream import EXAMPLES_PER_KIND, TrustedRecords
from stablealign.records import record_msg_id
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
    assert kept is not None and kept[1]["revised_answer"] == "a kind answer" and kept[1]["agent_id"] == 4

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


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), msg_id=st.one_of(st.none(), st.text(max_size=40)))
def test_any_bytes_and_any_id_are_kept_or_counted_never_raised(data, msg_id):
    trusted = TrustedRecords(WORLD, size=3, rounds=2)
    kept = trusted.admit(1, data, msg_id)
    assert trusted.stats.kept + trusted.stats.skipped_total == 1
    if kept is not None:
        rec, row = kept
        assert rec.world_id == WORLD and msg_id == record_msg_id(WORLD, rec.round, rec.agent_id)
        assert 0 <= rec.agent_id < 9 and 0 <= rec.round < 2 and row["agent_id"] == rec.agent_id
