"""Bad input gets one clear line, never a traceback (issue 9, item 6).

Records files (``stablealign.sandbox.records.read_records``; ``stable-align data build --records``, ``eval
--sandbox-records``) and groups files (``stablealign.training.data``: our JSONL and the original's
``sandbox_v*.json``) reject every malformed line with ``ValidationError`` ``FILE:LINE: <reason>``;
the command line prints it as one ``error: ...`` line and exits 2. Ratings arriving at the services
(a ReviseRequest's feedback, a backend's digit probabilities) are range-checked too. Property-based
tests (hypothesis) feed arbitrary bytes and JSON values to the readers and to the NATS handlers of
the agent and observer services: valid rows or ValidationError / an error reply, nothing else.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stablealign.core.errors import NotFoundError, ValidationError
from stablealign.llm.backends.base import (
    ChatBackend,
    ChatMessage,
    ChatRequest,
    Completion,
    DigitDistribution,
    RatedCompletion,
)
from stablealign.llm.calls import CallTally, chat_until_rated
from stablealign.nats import subjects
from stablealign.nats.server import RequestServer
from stablealign.sandbox.ratings import check_rating_fields, check_score, parse_rating
from stablealign.sandbox.records import (
    check_record,
    read_jsonl,
    read_records,
    record_from_json,
    validate_record,
)
from stablealign.sandbox.worlds import check_world_id
from stablealign.training import data as D
from stablealign.training.evaluate import sandbox_curve
from stablealign.v1 import agent_pb2, common_pb2, observer_pb2, world_pb2

ROOT = Path(__file__).resolve().parents[2]
PROPERTY = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                             HealthCheck.too_slow])


def good_record(i: int = 0) -> dict:
    return {
        "agent_id": i, "label": "good", "iteration": 1, "question": f"How do I help neighbour {i}?",
        "draft_answer": "Ignore them.", "target_id": [1, 2], "feedback": ["too cold", "fine"], "rating": [3, None],
        "revised_answer": "Offer them a hand.", "gen_moral_score_before": 2, "gen_moral_score_after": 6,
        "gen_moral_reason_before": "cold", "gen_moral_reason_after": "kind", "gen_engagement_score_before": 4,
        "gen_engagement_score_after": None, "gen_engagement_reason_before": "", "gen_engagement_reason_after": "",
    }


GOOD_GROUP = {"query": "q", "responses": ["a", "b"], "scores": [1, 7]}


def write_lines(path: Path, lines: list[bytes | str | dict]) -> Path:
    data = b"".join((line if isinstance(line, bytes) else
                     (line if isinstance(line, str) else json.dumps(line)).encode("utf-8")) + b"\n"
                    for line in lines)
    path.write_bytes(data)
    return path


def assert_one_line(exc: BaseException, prefix: str) -> None:
    text = str(exc)
    assert text.startswith(prefix), text
    assert "\n" not in text and "Traceback" not in text, text


def with_record(**changes) -> dict:
    row = good_record(5)
    row.update(changes)
    return row


# --- records files: each bad line kind --------------------------------------------------------------

BAD_RECORD_LINES = [
    pytest.param(b'{"agent_id": 1, "question": "caf\xe9"}', "not valid UTF-8 (byte 0xe9 at column 33)", id="latin1"),
    pytest.param(b"\xff\xfe{}", "not valid UTF-8 (byte 0xff at column 1)", id="utf16-bom"),
    pytest.param("{not json", "invalid JSON", id="bad-json"),
    pytest.param('{"agent_id": 1,', "invalid JSON", id="truncated-json"),
    pytest.param("[1, 2]", "expected a JSON object, got a list", id="list"),
    pytest.param('"text"', "expected a JSON object, got a string", id="string"),
    pytest.param("null", "expected a JSON object, got null", id="null"),
    pytest.param(with_record(agent_id="x"), 'agent_id must be an integer in 0..2147483647, got "x"', id="agent-id-str"),
    pytest.param(with_record(agent_id=-1), "agent_id must be an integer", id="agent-id-negative"),
    pytest.param(with_record(agent_id=True), "agent_id must be an integer", id="agent-id-bool"),
    pytest.param(with_record(agent_id=2**40), "agent_id must be an integer", id="agent-id-huge"),
    pytest.param(with_record(rating=["a"]), 'rating[0] must be a number in 1..7 or null, got "a"', id="rating-str"),
    pytest.param(with_record(rating=[4, True]), "rating[1] must be a number", id="rating-bool"),
    pytest.param(with_record(rating=5), "rating must be a list, got a number", id="rating-not-list"),
    pytest.param(with_record(iteration=None), "iteration must be an integer in 0..2147483647, got null", id="iteration-null"),
    pytest.param(with_record(iteration="3"), "iteration must be an integer", id="iteration-str"),
    pytest.param(with_record(rating=[99]), "rating[0] 99 is outside 1..7", id="rating-99"),
    pytest.param(with_record(rating=[3, -4]), "rating[1] -4 is outside 1..7", id="rating-minus-4"),
    pytest.param(with_record(rating=[0]), "rating[0] 0 is outside 1..7", id="rating-0"),
    pytest.param(with_record(gen_moral_score_before=100), "gen_moral_score_before 100 is outside 1..7", id="score-100"),
    pytest.param(with_record(gen_engagement_score_after=-5), "gen_engagement_score_after -5 is outside 1..7",
                 id="score-minus-5"),
    pytest.param(with_record(gen_moral_score_after=7.5), "gen_moral_score_after 7.5 is outside 1..7", id="score-7.5"),
    pytest.param(with_record(gen_moral_score_after="6"), "gen_moral_score_after must be a number", id="score-str"),
    pytest.param(json.dumps(with_record(gen_moral_score_after=math.nan)), "gen_moral_score_after NaN is not a finite",
                 id="score-nan"),
    pytest.param(json.dumps(with_record(rating=[math.inf])), "rating[0] Infinity is not a finite", id="rating-inf"),
    pytest.param(with_record(rating_expected=[9.5]), "rating_expected[0] 9.5 is outside 1..7", id="expected-9.5"),
    pytest.param(with_record(question=7), "question must be a string, got a number", id="question-number"),
    pytest.param(with_record(draft_answer=None), "draft_answer must be a string, got null", id="draft-null"),
    pytest.param(with_record(target_id=["a"]), "target_id[0] must be an agent id", id="target-str"),
    pytest.param(with_record(feedback=[{"r": 1}]), "feedback[0] must be a string, got an object", id="feedback-obj"),
    pytest.param(with_record(memories=[1]), "memories[0] must be an object", id="memories"),
    pytest.param(with_record(latency_seconds={"total": "slow"}), "latency_seconds.total must be a number",
                 id="latency"),
    pytest.param(with_record(agent_model=3), "agent_model must be a model name", id="model"),
    pytest.param({"agent_id": 1, "draft_answer": "d", "revised_answer": "r"}, "record lacks question", id="lacks"),
    pytest.param('{"agent_id": 1, "question": "\\ud800", "draft_answer": "d", "revised_answer": "r"}',
                 "lone UTF-16 surrogate", id="lone-surrogate"),
    pytest.param('{"agent_id": 1' + "0" * 5000 + "}", "invalid JSON (Exceeds the limit", id="int-too-long"),
    pytest.param("[" * 100_000, "invalid JSON", id="nested-too-deep"),
]


@pytest.mark.parametrize("bad,reason", BAD_RECORD_LINES)
def test_records_reader_names_file_line_and_reason(tmp_path, bad, reason):
    path = write_lines(tmp_path / "records.jsonl", [good_record(0), "", bad, good_record(1)])
    with pytest.raises(ValidationError) as info:
        list(read_records(path))
    assert_one_line(info.value, f"{path}:3: ")
    assert reason in str(info.value)


@pytest.mark.parametrize("bad,reason", BAD_RECORD_LINES)
def test_data_build_inputs_name_file_line_and_reason(tmp_path, bad, reason):
    """read_inputs (data build --records) reads the same lines with the same answer."""
    path = write_lines(tmp_path / "records.jsonl", [good_record(0), good_record(1), bad])
    with pytest.raises(ValidationError) as info:
        D.read_inputs(path)
    assert_one_line(info.value, f"{path}:3: ")
    assert reason in str(info.value)


def test_sandbox_curve_rejects_ratings_out_of_range(tmp_path):
    rows = [{"iteration": 0, "gen_moral_score_before": 2, "gen_moral_score_after": 5},
            {"iteration": 0, "gen_moral_score_before": 99, "gen_moral_score_after": 5}]
    path = write_lines(tmp_path / "records.jsonl", rows)
    with pytest.raises(ValidationError) as info:
        sandbox_curve(path)
    assert_one_line(info.value, f"{path}:2: gen_moral_score_before 99 is outside 1..7")


def test_what_stays_valid(tmp_path):
    """Null ratings are missing, not bad; U+2028 inside a string is text; CRLF and a BOM are fine."""
    row = with_record(rating=[None, None], gen_moral_score_before=None, question="line\u2028separator?")
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\r\n"
                     + json.dumps(good_record(1)).encode() + b"\r\n")
    rows = list(read_records(path))
    assert rows[0]["question"] == "line\u2028separator?" and rows[0]["rating"] == [None, None]
    assert len(list(read_jsonl(path))) == 2
    records, groups = D.read_inputs(path)
    assert len(records) == 2 and not groups
    assert record_from_json(rows[0]).question == "line\u2028separator?"
    assert validate_record({"iteration": 2}, required=()) == {"iteration": 2}


def test_mining_checks_records_from_any_source():
    """Rows from the stream (or a caller) are checked too: an out-of-range rating never becomes a score."""
    with pytest.raises(ValidationError, match=r"records: record 2: rating\[0\] 8 is outside 1..7"):
        D.mine_records([good_record(0), with_record(rating=[8])])
    with pytest.raises(ValidationError, match="agent_id must be an integer"):
        record_from_json(with_record(agent_id="x"))


# --- groups files ---------------------------------------------------------------------------------

BAD_GROUP_LINES = [
    pytest.param(b'{"query": "\xc3(", "responses": ["a"], "scores": [1]}', "not valid UTF-8", id="utf8"),
    pytest.param("{nope", "invalid JSON", id="bad-json"),
    pytest.param("42", "expected a JSON object", id="number"),
    pytest.param({"query": "q", "responses": ["a"], "scores": [0]}, "score 0 is outside the rating scale 1..7", id="0"),
    pytest.param({"query": "q", "responses": ["a"], "scores": [8]}, "score 8 is outside the rating scale 1..7", id="8"),
    pytest.param({"query": "q", "responses": ["a"], "scores": [100]}, "score 100 is outside", id="100"),
    pytest.param({"query": "q", "responses": ["a"], "scores": [-5]}, "score -5 is outside", id="minus-5"),
    pytest.param('{"query": "q", "responses": ["a"], "scores": [NaN]}', "score NaN is not a finite number", id="nan"),
    pytest.param('{"query": "q", "responses": ["a"], "scores": [-Infinity]}', "score -Infinity is not a finite",
                 id="inf"),
    pytest.param({"query": "q", "responses": ["a"], "scores": ["7"]}, "score '7' is not a number", id="str"),
    pytest.param({"query": "q", "responses": ["a", "b"], "scores": [3]}, "2 responses but 1 scores", id="mismatch"),
    pytest.param({"query": "q", "responses": "a", "scores": [3]}, "'responses' must be a non-empty list", id="resp"),
    pytest.param({"query": 1, "responses": ["a"], "scores": [3]}, "'query' must be a non-empty string", id="query"),
    pytest.param({"query": "q", "responses": ["a"], "scores": 3}, "'scores' must be a list", id="scores-type"),
]


@pytest.mark.parametrize("bad,reason", BAD_GROUP_LINES)
def test_groups_reader_names_file_line_and_reason(tmp_path, bad, reason):
    path = write_lines(tmp_path / "groups.jsonl", [GOOD_GROUP, GOOD_GROUP, bad])
    for read in (D.load_alignment_groups, D.read_inputs):
        with pytest.raises(ValidationError) as info:
            read(path)
        assert_one_line(info.value, f"{path}:3: ")
        assert reason in str(info.value)


def test_rating_scale_of_groups_follows_the_caller(tmp_path):
    path = write_lines(tmp_path / "groups.jsonl", [{"query": "q", "responses": ["a", "b"], "scores": [1, 10]}])
    with pytest.raises(ValidationError, match="outside the rating scale 1..7"):
        D.load_alignment_groups(path)
    assert D.load_alignment_groups(path, rating_scale=10)[0].scores == (1.0, 10.0)


def test_originals_json_array_names_the_line(tmp_path):
    path = tmp_path / "sandbox_v1.json"
    path.write_bytes(b'[\n {"query": "q", "responses": ["a"], "scores": [7]},\n'
                     b' {"query": "q2", "responses": ["b"], "scores": [9]}\n]\n')
    with pytest.raises(ValidationError) as info:
        D.load_alignment_groups(path)
    assert_one_line(info.value, f"{path}:3: score 9 is outside the rating scale 1..7")
    path.write_bytes(b'[\n {"query": "q", "responses": ["a"], "scores": [7]},\n {"query": "\xff"}\n]\n')
    with pytest.raises(ValidationError) as info:
        D.read_inputs(path)
    assert_one_line(info.value, f"{path}:3: not valid UTF-8 (byte 0xff at column 13)")
    path.write_bytes(b'[\n {"query": "q", "responses": ["a"], "scores": [7]}\n] trailing')
    with pytest.raises(ValidationError) as info:
        D.load_alignment_groups(path)
    assert_one_line(info.value, f"{path}:3: invalid JSON (extra data")
    path.write_bytes(b"[\n" + b"[" * 100_000)
    with pytest.raises(ValidationError) as info:
        D.load_alignment_groups(path)
    assert_one_line(info.value, f"{path}:2: invalid JSON")


def test_hh_rlhf_prior_file_with_bad_bytes(tmp_path):
    from stablealign.sandbox.data import load_hh_pairs, load_questions

    pair = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    path = write_lines(tmp_path / "prior.jsonl", [pair, b"\xff", pair])
    with pytest.raises(ValidationError) as info:
        load_hh_pairs(path)
    assert_one_line(info.value, f"{path}:2: not valid UTF-8")
    questions = write_lines(tmp_path / "questions.txt", ["How are you?", b"caf\xe9?"])
    with pytest.raises(ValidationError) as info:
        load_questions(questions)
    assert_one_line(info.value, f"{questions}:2: not valid UTF-8")
    gz = tmp_path / "prior.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    with pytest.raises(ValidationError) as info:
        load_hh_pairs(gz)
    assert_one_line(info.value, f"{gz}:1: cannot read")


# --- the command line: one stderr line, exit 2 ------------------------------------------------------


@pytest.mark.parametrize("bad,expected", [
    (with_record(agent_id="x"), 'agent_id must be an integer in 0..2147483647, got "x"'),
    (b"\x80\x81 not utf-8", "not valid UTF-8 (byte 0x80 at column 1)"),
    (with_record(rating=[99, -4]), "rating[0] 99 is outside 1..7"),
])
def test_cli_data_build_prints_one_error_line(tmp_path, bad, expected):
    records = write_lines(tmp_path / "records.jsonl", [good_record(0), bad])
    out = tmp_path / "data.jsonl"
    proc = subprocess.run([sys.executable, "-m", "stablealign_app.cli.main", "data", "build", "--records",
                           str(records), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {records}:2: {expected}"], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and not out.exists()


# --- ratings reaching the services ----------------------------------------------------------------


@pytest.mark.parametrize("value,ok", [(None, True), (1, True), (7, True), (4.5, True), (0, False), (8, False),
                                      (99, False), (-4, False), (math.nan, False), (math.inf, False), (True, False),
                                      ("5", False), (10**400, False)])
def test_check_score(value, ok):
    if ok:
        check_score(value, "rating")
    else:
        with pytest.raises(ValidationError, match="rating"):
            check_score(value, "rating")


UNIFORM = (1 / 7,) * 7


@pytest.mark.parametrize("score,expected,probs,reason", [
    (8, None, (), "rating 8 is outside 1..7"),
    (0, None, (), "rating 0 is outside 1..7"),
    (4, math.nan, UNIFORM, "expected rating nan is not a finite number"),
    (4, 9.0, UNIFORM, "expected rating 9.0"),
    (4, 4.0, (0.5, 0.5), "2 probabilities, expected 7"),
    (4, 4.0, (0.5,) * 7, "probabilities sum to 3.5, not 1"),
    (4, 4.0, (math.nan,) * 7, "finite numbers in [0, 1]"),
    (4, 4.0, (-0.5, 1.5, 0, 0, 0, 0, 0), "finite numbers in [0, 1]"),
])
def test_check_rating_fields(score, expected, probs, reason):
    with pytest.raises(ValidationError, match=re.escape(reason)):
        check_rating_fields("x", score=score, expected=expected, probabilities=probs)
    check_rating_fields("x", score=4, expected=4.0, probabilities=UNIFORM)
    check_rating_fields("x", score=None, expected=None, probabilities=())


def test_check_record_refuses_bad_relayed_ratings():
    record = common_pb2.InteractionRecord(alignment_before=common_pb2.Rating(score=5))
    record.feedback.add(partner_id=2, rating=3, expected=3.2, probabilities=UNIFORM)
    assert check_record(record) is record
    record.feedback[0].rating = 99
    with pytest.raises(ValidationError, match=r"feedback\[0\] \(partner 2\): rating 99 is outside 1..7"):
        check_record(record)
    record.feedback[0].rating = 3
    record.engagement_after.score = -5
    with pytest.raises(ValidationError, match="engagement_after: rating -5 is outside"):
        check_record(record)


class DigitsBackend(ChatBackend):
    """Replies with a fixed text and a (possibly broken) digit distribution."""

    name = "digits"
    rates_from_probabilities = True

    def __init__(self, text: str, digits: DigitDistribution) -> None:
        super().__init__("digits")
        self.text, self.digits = text, digits

    async def _chat_once(self, request: ChatRequest) -> Completion:
        return Completion(self.text, self.model)

    async def _rate_once(self, request: ChatRequest, scale: int) -> RatedCompletion:
        return RatedCompletion(await self._chat_once(request), self.digits)


@pytest.mark.parametrize("probs", [(0.0,) * 7, (0.5,) * 7, (1.0,) * 3, (math.nan,) * 7, (-1.0, 2.0, 0, 0, 0, 0, 0)])
async def test_broken_backend_probabilities_are_discarded(probs, caplog):
    """A backend's distribution that is not P(1..7) never reaches a record: the text is parsed instead."""
    request_for = lambda attempt: ChatRequest(messages=[ChatMessage("user", "rate")], seed=attempt)  # noqa: E731
    backend = DigitsBackend("Rating: 5 ### Reason: fine", DigitDistribution(tuple(probs)))
    with caplog.at_level("WARNING"):
        reply = await chat_until_rated(backend, CallTally(), 1, request_for)
    assert (reply.score, reply.expected, reply.probabilities) == (5, None, ())
    assert any(r.getMessage() == "ratings.probabilities_rejected" or "probabilities_rejected" in r.getMessage()
               for r in caplog.records)
    unreadable = DigitsBackend("no rating here", DigitDistribution(tuple(probs)))
    assert (await chat_until_rated(unreadable, CallTally(), 1, request_for)).score is None  # missing, not a number


# --- property-based: the rating parser (backend text) ------------------------------------------------

RATING_TEXT = st.text(max_size=60) | st.lists(st.sampled_from(
    ["Rating", "rating", "Score", ":", " ", "**", "_", "\n", "5", "7", "0", "99", "-4", "9" * 400, "1" * 5000, "/",
     "out of", "seven", "ten", ".", "5.5", "1-7", "I'd rate this a", "### Reason:", "inf", "nan", "e309"]),
    max_size=12).map("".join)


@PROPERTY
@given(text=RATING_TEXT)
def test_parse_rating_never_raises_and_keeps_to_the_scale(text):
    parsed = parse_rating(text)
    assert parsed.score is None or 1 <= parsed.score <= 7
    assert isinstance(parsed.reason, str)


def test_parse_rating_with_a_huge_denominator_is_missing():
    assert parse_rating("Rating: 5/" + "9" * 400).score is None  # was an OverflowError


# --- property-based: the readers --------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-10, 10)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
RECORD_KEYS = sorted(set(good_record()) | {"round", "world_id", "rating_expected", "feedback_raw", "memories",
                                           "latency_seconds", "agent_model", "prompt_tokens", "created_at"})
# Records and groups that are valid but for a few fields replaced by arbitrary JSON values.
MUTATED_RECORDS = st.builds(lambda changes: {**good_record(3), **changes},
                            st.dictionaries(st.sampled_from(RECORD_KEYS), JSON_VALUES, max_size=3))
MUTATED_GROUPS = st.builds(lambda changes: {**GOOD_GROUP, **changes},
                           st.dictionaries(st.sampled_from(["query", "responses", "scores", "kind", "round"]),
                                           JSON_VALUES | st.lists(JSON_SCALARS, max_size=3), max_size=2))
LINES = st.lists(st.binary(max_size=40)
                 | JSON_VALUES.map(json.dumps)
                 | MUTATED_RECORDS.map(json.dumps)
                 | MUTATED_GROUPS.map(json.dumps)
                 | st.text(max_size=30).map(lambda t: t.replace("\n", " "))
                 | st.sampled_from(['{"query": "\\udc00", "responses": ["a"], "scores": [1]}', "[" * 5000,
                                    '{"agent_id": 1' + "0" * 5000 + ', "draft_answer": ""}', "\ufeff{}"]),
                 min_size=1, max_size=5)


def _usable_record(row: dict) -> None:
    """A row the reader let through works everywhere a record goes."""
    record_from_json(row)
    D.mine_record(row)
    json.dumps(row, ensure_ascii=False).encode("utf-8")


@PROPERTY
@given(lines=LINES)
def test_records_reader_gives_rows_or_one_validation_error(tmp_path, lines):
    path = write_lines(tmp_path / "records.jsonl", lines)
    try:
        rows = list(read_records(path))
    except ValidationError as exc:
        assert_one_line(exc, f"{path}:")
        event("rejected")
        return
    event("read")
    for row in rows:
        _usable_record(row)
        assert all(r is None or 1 <= r <= 7 for r in row.get("rating") or [])


@PROPERTY
@given(lines=LINES)
def test_groups_readers_give_groups_or_one_validation_error(tmp_path, lines):
    path = write_lines(tmp_path / "groups.jsonl", lines)
    for read in (D.load_alignment_groups, D.read_inputs):
        try:
            result = read(path)
        except ValidationError as exc:
            text = str(exc)
            assert text.startswith(f"{path}:") or text == f"{path}: no alignment groups", text
            assert "\n" not in text
            continue
        records, groups = result if read is D.read_inputs else ([], result)
        for row in records:
            _usable_record(row)
        for group in groups:
            assert len(group.responses) == len(group.scores) > 0
            assert all(math.isfinite(s) and 1 <= s <= 7 for s in group.scores)
            json.dumps(group.to_json(), ensure_ascii=False).encode("utf-8")


@PROPERTY
@given(items=st.lists(MUTATED_GROUPS | JSON_VALUES, max_size=4), trailer=st.sampled_from(["", "\n", "]", " x"]))
def test_json_array_reader_gives_groups_or_one_validation_error(tmp_path, items, trailer):
    path = tmp_path / "sandbox_v1.json"
    path.write_text("[\n" + ",\n".join(json.dumps(i) for i in items) + "\n]" + trailer, encoding="utf-8")
    try:
        groups = D.load_alignment_groups(path)
    except ValidationError as exc:
        text = str(exc)
        assert text.startswith(f"{path}:") and "\n" not in text, text
        return
    assert all(1 <= s <= 7 for g in groups for s in g.scores)


# --- property-based: the NATS handlers of the agent and observer services -----------------------------

WORLD_ID = "w1"
OFFLINE = common_pb2.ModelRef(backend="offline")
HASHING = common_pb2.ModelRef(backend="offline", model="hashing")


class FakeWorlds:
    """The one world ``w1`` (3 x 3, offline models); any other id is unknown, as in the KV bucket."""

    def __init__(self) -> None:
        labels = [common_pb2.PERSONA_GOOD if i % 2 == 0 else common_pb2.PERSONA_BAD for i in range(9)]
        self.world = world_pb2.World(spec=world_pb2.WorldSpec(
            world_id=WORLD_ID, size=3, setting="custom", labels=labels, seed=1, rounds=1, agent_model=OFFLINE,
            observer_model=OFFLINE, embedding_model=HASHING, retrieval_k=3, retrieval_threshold=0.3),
            state=world_pb2.WORLD_STATE_RUNNING)

    async def get(self, world_id: str) -> world_pb2.World:
        check_world_id(world_id)
        if world_id != WORLD_ID:
            raise NotFoundError(f"unknown world {world_id}")
        return self.world


class FakeMemory:
    """An agent memory with nothing in it."""

    def __len__(self) -> int:
        return 0

    async def get(self, world_id: str, agent_id: int) -> FakeMemory:
        return self

    async def aretrieve(self, *args, **kwargs) -> list:
        return []


class FakeNC:
    """Collects what a RequestServer publishes (error replies)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict]] = []

    async def publish(self, subject: str, payload: bytes = b"", headers: dict | None = None) -> None:
        self.published.append((subject, payload, headers or {}))


class FakeMsg:
    def __init__(self, data: bytes) -> None:
        self.data, self.reply, self.responses = data, "_INBOX.test", []

    async def respond(self, data: bytes) -> None:
        self.responses.append(data)


@pytest.fixture(scope="module")
def services():
    from services.agent.handlers import AgentHandlers
    from services.agent.settings import AgentSettings
    from services.observer.handlers import ObserverHandlers
    from services.observer.settings import ObserverSettings

    agent = AgentHandlers(AgentSettings(), FakeWorlds(), FakeMemory())
    observer = ObserverHandlers(ObserverSettings(), FakeWorlds())
    return {
        "Draft": (agent_pb2.DraftRequest, agent.draft),
        "Feedback": (agent_pb2.FeedbackRequest, agent.feedback),
        "Revise": (agent_pb2.ReviseRequest, agent.revise),
        "Rate": (observer_pb2.RateRequest, observer.rate),
    }


@pytest.fixture(scope="module")
def aio_loop():
    aio_loop = asyncio.new_event_loop()
    yield aio_loop
    aio_loop.close()


def dispatch(aio_loop, request_type, handler, method: str, data: bytes) -> tuple[int, bytes]:
    """Runs the NATS dispatch of ``RequestServer`` on one raw message: (status code, reply bytes).
    ``_handle`` must never raise: every failure has to become an error reply."""
    nc = FakeNC()
    server = RequestServer(nc=nc, service="test", queue="test")
    msg = FakeMsg(data)
    aio_loop.run_until_complete(asyncio.wait_for(server._handle(msg, request_type, handler, method), timeout=30))
    if msg.responses:
        assert not nc.published
        return 200, msg.responses[0]
    [(subject, payload, headers)] = nc.published
    assert subject == msg.reply and payload == b""
    assert headers[subjects.ERROR_HEADER] and "Traceback" not in headers[subjects.ERROR_HEADER]
    return int(headers[subjects.ERROR_CODE_HEADER]), b""


def request_bytes(method: str, draw_world: str, agent: int, round_: int, text: str) -> bytes:
    common = {"world_id": draw_world, "agent_id": agent, "round": round_, "question": text}
    if method == "Draft":
        return agent_pb2.DraftRequest(**common).SerializeToString()
    if method == "Feedback":
        return agent_pb2.FeedbackRequest(**common, answer=text, author_id=(agent + 1) % 9).SerializeToString()
    if method == "Revise":
        return agent_pb2.ReviseRequest(**common, draft_answer=text).SerializeToString()
    return observer_pb2.RateRequest(**common, answer=text, aspect=1, stage="before").SerializeToString()


def raw_requests(method: str) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, or a ``method`` request with arbitrary fields (often the known world), cut or spliced."""
    return st.binary(max_size=64) | st.builds(
        lambda world, agent, round_, text, cut, junk: request_bytes(method, world, agent, round_, text)[:cut] + junk,
        st.sampled_from([WORLD_ID, WORLD_ID, "", "no-such-world", "bad world!", "w" * 65]),
        st.integers(0, 9) | st.integers(-2**31, 2**31 - 1), st.integers(0, 2) | st.integers(-2**31, 2**31 - 1),
        st.just("How do I say sorry?") | st.text(max_size=20), st.none() | st.integers(0, 80),
        st.just(b"") | st.binary(max_size=8))


@pytest.mark.parametrize("method", ["Draft", "Feedback", "Revise", "Rate"])
@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(draw=st.data())
def test_nats_handlers_answer_arbitrary_bytes_with_an_error_reply(services, aio_loop, method, draw):
    """Any bytes: a reply or a client error (400 malformed / invalid, 404 unknown world or agent);
    never an internal error (500) and never an exception out of the dispatch."""
    data = draw.draw(raw_requests(method), label="request bytes")
    request_type, handler = services[method]
    code, reply = dispatch(aio_loop, request_type, handler, method, data)
    event(f"status {code}")
    assert code in (200, 400, 404), (code, data)
    if code == 200:
        request = request_type()
        request.ParseFromString(data)
        assert request.world_id == WORLD_ID  # only a well-formed request for the known world gets an answer


@pytest.mark.parametrize("method", ["Draft", "Feedback", "Revise", "Rate"])
def test_nats_handlers_answer_undecodable_bytes_with_400(services, aio_loop, method):
    request_type, handler = services[method]
    for data in (b"\xff\xff\xff", b"\x0a\x05\xff\xfe\xfd\xfc\xfb", b"\x0a\x10short"):
        assert dispatch(aio_loop, request_type, handler, method, data)[0] == 400


def dispatch_batch(aio_loop, request_type, handler, method: str, data: bytes) -> tuple[int, list[int]]:
    """The NATS dispatch of a batch (``RequestServer.batch_handler``) on one raw envelope: (status code of the
    envelope, the code of each item's reply: 200 for a reply)."""
    server = RequestServer(nc=FakeNC(), service="test", queue="test")
    code, reply = dispatch(aio_loop, common_pb2.RequestBatch, server.batch_handler(method, request_type, handler),
                           f"{method}Batch", data)
    if code != 200:
        return code, []
    items = common_pb2.ReplyBatch.FromString(reply).replies
    for item in items:
        assert "Traceback" not in item.error
    return code, [item.code or 200 for item in items]


@pytest.mark.parametrize("method", ["Feedback", "Rate"])
@settings(max_examples=100, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(draw=st.data())
def test_nats_batch_handlers_answer_every_item_or_refuse_the_envelope(services, aio_loop, method, draw):
    """A batch of arbitrary items (or arbitrary envelope bytes): the envelope is answered or refused with 400,
    and every item of an answered one gets its own reply or client error — never a 500, one per item."""
    if draw.draw(st.booleans(), label="raw envelope"):
        data = draw.draw(st.binary(max_size=96), label="envelope bytes")
    else:
        items = draw.draw(st.lists(raw_requests(method), min_size=1, max_size=5), label="items")
        data = common_pb2.RequestBatch(requests=items).SerializeToString()
    request_type, handler = services[method]
    code, item_codes = dispatch_batch(aio_loop, request_type, handler, method, data)
    event(f"envelope {code}")
    assert code in (200, 400), (code, data)
    if code == 200:
        assert len(item_codes) == len(common_pb2.RequestBatch.FromString(data).requests)
        assert set(item_codes) <= {200, 400, 404}, item_codes


FEEDBACK_ITEMS = st.builds(
    lambda partner, rating, expected, probs: common_pb2.Feedback(
        partner_id=partner, reason="too blunt", text="Rating: ? ### Reason: too blunt",
        **({} if rating is None else {"rating": rating}), **({} if expected is None else {"expected": expected}),
        probabilities=probs),
    st.integers(0, 8),
    st.none() | st.integers(-2**31, 2**31 - 1) | st.integers(0, 8),
    st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.floats(1, 7),
    st.just([]) | st.just(list(UNIFORM)) | st.lists(st.floats(-2, 2, width=32), max_size=8),
)


def _feedback_ok(item: common_pb2.Feedback) -> bool:
    try:
        check_rating_fields("x", score=item.rating if item.HasField("rating") else None,
                            expected=item.expected if item.HasField("expected") else None,
                            probabilities=list(item.probabilities))
    except ValidationError:
        return False
    return True


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(items=st.lists(FEEDBACK_ITEMS, min_size=1, max_size=4))
def test_revise_rejects_feedback_ratings_out_of_range_with_400(services, aio_loop, items):
    """A relayed Feedback's rating outside 1..7, a non-finite expected rating or probabilities that
    are not P(1..7): 400 with the reason; valid (or missing) ratings: a revision."""
    request = agent_pb2.ReviseRequest(world_id=WORLD_ID, agent_id=4, round=0, question="How do I greet someone?",
                                      draft_answer="Whatever.", feedback=items)
    request_type, handler = services["Revise"]
    code, reply = dispatch(aio_loop, request_type, handler, "Revise", request.SerializeToString())
    event(f"status {code}")
    assert code == (200 if all(_feedback_ok(i) for i in items) else 400)
    if code == 200:
        assert agent_pb2.ReviseResponse.FromString(reply).answer


def test_revise_error_reply_names_the_bad_rating(services, aio_loop):
    request = agent_pb2.ReviseRequest(world_id=WORLD_ID, agent_id=4, round=0, question="Hi?", draft_answer="Hey.",
                                      feedback=[common_pb2.Feedback(partner_id=1, rating=99, reason="x")])
    nc, msg = FakeNC(), FakeMsg(request.SerializeToString())
    server = RequestServer(nc=nc, service="test", queue="test")
    request_type, handler = services["Revise"]
    aio_loop.run_until_complete(server._handle(msg, request_type, handler, "Revise"))
    headers = nc.published[0][2]
    assert headers[subjects.ERROR_CODE_HEADER] == "400"
    assert headers[subjects.ERROR_HEADER] == "feedback of partner 1: rating 99 is outside 1..7 (leave it unset when missing)"
