"""Mining alignment groups from SANDBOX records; mix, dedupe, split; validation of group files."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from stablealign.core.errors import ValidationError
from stablealign.training import data as D
from stablealign.training.repetition import loops


def record(i: int, *, before=3, after=6, ratings=(4, 5), question=None) -> dict:
    return {
        "agent_id": i % 9, "label": "good", "iteration": 1, "round": 1, "world_id": "w-1",
        "question": question or f"How should I treat my neighbour number {i}?",
        "draft_answer": f"Ignore them, neighbour {i} does not matter.",
        "revised_answer": f"Be kind and respectful to neighbour {i}.",
        "target_id": [1, 2][: len(ratings)], "feedback": [f"Rating: {r} ### Reason: r{i}" for r in ratings],
        "rating": list(ratings), "gen_moral_score_before": before, "gen_moral_score_after": after,
        "agent_model": {"backend": "offline", "model": "offline-1"},
        "observer_model": {"backend": "offline", "model": "offline-1"},
    }


def test_mines_three_kinds_with_provenance():
    groups = D.mine_record(record(0))
    kinds = {g.kind: g for g in groups}
    assert set(kinds) == {"imitation", "self_critic", "realignment"}
    imitation = kinds["imitation"]
    assert imitation.query == "How should I treat my neighbour number 0?"
    assert imitation.responses == ("Ignore them, neighbour 0 does not matter.", "Be kind and respectful to neighbour 0.")
    assert imitation.scores == (3.0, 6.0)
    critic = kinds["self_critic"]
    assert critic.scores == (4.0, 5.0) and critic.responses[0].startswith("Rating: 4")
    assert "Ignore them" in critic.query  # the answer being judged is in the prompt
    realign = kinds["realignment"]
    assert realign.responses == (imitation.responses[1], imitation.responses[0])  # revision first, draft as negative
    assert realign.scores == (6.0, 3.0)
    assert "Ignore them" in realign.query and "Rating: 4" in realign.query
    row = imitation.to_json()
    assert {k: row[k] for k in ("kind", "world_id", "round", "agent_id")} == {
        "kind": "imitation", "world_id": "w-1", "round": 1, "agent_id": 0}
    assert row["models"]["agent"] == {"backend": "offline", "model": "offline-1"}


def test_null_ratings_drop_the_response_never_invent_a_score():
    groups = {g.kind: g for g in D.mine_record(record(1, before=None, ratings=(None, 2)))}
    assert groups["imitation"].responses == ("Be kind and respectful to neighbour 1.",)  # one-response group
    assert groups["imitation"].scores == (6.0,)
    assert groups["self_critic"].scores == (2.0,)
    assert "realignment" not in groups  # needs both ratings
    assert D.mine_record(record(2, before=None, after=None, ratings=(None,)) ) == []


@pytest.mark.parametrize("before,after,expected", [(3, 6, True), (5, 5, False), (2, 4, False), (6, 5, False), (4, 5, True)])
def test_realignment_condition(before, after, expected):
    kinds = {g.kind for g in D.mine_record(record(3, before=before, after=after))}
    assert ("realignment" in kinds) is expected


def test_mix_ratio_dedupe_and_holdout_without_question_overlap():
    rows = [record(i, after=6 if i % 2 else 4) for i in range(40)]  # 20 realignments
    rows += [record(0), record(1)]  # exact duplicates
    result = D.build_alignment_data(rows, mix_ratio="5:1:1", holdout=0.2, seed=7)
    kinds = result.stats["kinds"]
    assert kinds["imitation"]["mined"] == 42 and kinds["imitation"]["unique"] == 40
    # scale = min(40/5, 40/1, 20/1) = 8 -> 40 : 8 : 8
    assert (kinds["imitation"]["mixed"], kinds["self_critic"]["mixed"], kinds["realignment"]["mixed"]) == (40, 8, 8)
    train_q = {g.question for g in result.train}
    held_q = {g.question for g in result.heldout}
    assert held_q and train_q and not (train_q & held_q)
    assert not ({g.query for g in result.train} & {g.query for g in result.heldout})
    again = D.build_alignment_data(rows, mix_ratio="5:1:1", holdout=0.2, seed=7)
    assert [g.key for g in again.train] == [g.key for g in result.train]  # seeded
    other = D.build_alignment_data(rows, mix_ratio="5:1:1", holdout=0.2, seed=8)
    assert [g.key for g in other.train] != [g.key for g in result.train]
    assert sum(Counter(kinds["imitation"]["score_histogram"]).values()) == 80


def test_mix_leaves_out_kinds_without_data():
    rows = [record(i, before=5, after=5) for i in range(10)]  # no realignment at all
    mixed = D.mix(D.mine_records(rows), D.parse_mix("5:1:1"), random.Random(0))
    counts = Counter(g.kind for g in mixed)
    assert counts == {"imitation": 10, "self_critic": 2}
    with pytest.raises(ValidationError):
        D.parse_mix("5:1")
    with pytest.raises(ValidationError):
        D.parse_mix("0:0:0")


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("bad,message", [
    ({"query": "q", "responses": ["a"]}, "missing key(s) scores"),
    ({"query": "q", "responses": [], "scores": []}, "non-empty list"),
    ({"query": "q", "responses": ["a", " "], "scores": [1, 2]}, "non-empty string"),
    ({"query": "q", "responses": ["a"], "scores": ["high"]}, "not a number"),
    ({"query": "q", "responses": ["a"], "scores": [True]}, "not a number"),
    ({"query": "q", "responses": ["a", "b"], "scores": [1]}, "2 responses but 1 scores"),
    ("{not json", "invalid JSON"),
])
def test_bad_group_files_name_file_and_line(tmp_path, bad, message):
    good = {"query": "q", "responses": ["a", "b"], "scores": [1, 7]}
    path = _write(tmp_path, "groups.jsonl", [good, good, bad])
    with pytest.raises(ValidationError) as info:
        D.load_alignment_groups(path)
    assert f"{path}:3" in str(info.value) and message in str(info.value)


def test_single_response_groups_and_truncation(tmp_path, caplog):
    path = _write(tmp_path, "groups.jsonl", [
        {"query": "q1", "responses": ["only one"], "scores": [5]},
        {"query": "q2", "responses": ["x" * 500, "short"], "scores": [2, 6], "note": "kept"},
    ])
    with caplog.at_level("WARNING"):
        groups = D.load_alignment_groups(path, max_chars=100)
    assert groups[0].responses == ("only one",)
    assert len(groups[1].responses[0]) == 100
    assert groups[1].extra == {"note": "kept"}
    assert any(getattr(r, "texts", None) == 1 for r in caplog.records)


def test_reads_the_originals_json_array_format(tmp_path):
    path = tmp_path / "sandbox_v1.json"
    path.write_text(json.dumps([
        {"query": "How do I make friends?", "responses": ["Be open.", "Don't bother."], "scores": [7, 2]},
        {"query": "Q2", "responses": ["A"], "scores": [4]},
    ], indent=2))
    groups = D.load_alignment_groups(path)
    assert [g.kind for g in groups] == ["original", "original"]
    assert groups[0].scores == (7.0, 2.0)
    records, ready = D.read_inputs(path)
    assert records == [] and len(ready) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"query": "q", "responses": ["a"], "scores": [1]},\n {"query": "q"}\n]')
    with pytest.raises(ValidationError, match=f"{bad}:3"):
        D.load_alignment_groups(bad)


def test_cli_data_build_writes_train_heldout_and_stats(tmp_path):
    from typer.testing import CliRunner

    from stablealign_app.cli.main import app

    records = _write(tmp_path, "records.jsonl", [record(i) for i in range(20)])
    out = tmp_path / "data" / "alignment.jsonl"
    result = CliRunner().invoke(app, ["data", "build", "--records", str(records), "--out", str(out),
                                      "--mix", "1:1:1", "--holdout", "0.25", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "imitation" in result.output and "score histogram" in result.output
    train = D.load_alignment_groups(out)
    held = D.load_alignment_groups(out.with_name("alignment.heldout.jsonl"))
    stats = json.loads(out.with_name("alignment.stats.json").read_text())
    assert len(train) + len(held) == stats["total"]["mixed"] == 60
    missing = CliRunner().invoke(app, ["data", "build", "--records", str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_expected_ratings_score_responses_where_the_record_has_them():
    row = record(4, before=1, after=1, ratings=(1, 1))  # argmax ratings: all ties
    row.update(gen_moral_expected_before=2.25, gen_moral_expected_after=3.5, rating_expected=[1.75, None])
    by_kind = {g.kind: g for g in D.mine_record(row)}
    assert by_kind["imitation"].scores == (2.25, 3.5)
    assert by_kind["self_critic"].scores == (1.75, 1.0)  # a partner without an expected rating keeps its rating
    assert "realignment" not in by_kind  # after 3.5 is not > 4
    plain = {g.kind: g for g in D.mine_record(row, scores="rating")}
    assert plain["imitation"].scores == (1.0, 1.0) and plain["self_critic"].scores == (1.0, 1.0)
    with pytest.raises(ValidationError, match="scores 'argmax'"):
        D.mine_record(row, scores="argmax")


def test_build_reports_the_share_of_tied_groups():
    rows = []
    for i in range(20):
        row = record(i, before=1, after=1, ratings=(1, 1))
        if i % 4 == 0:  # a quarter carry expected ratings that rank draft and revision
            row.update(gen_moral_expected_before=1.5, gen_moral_expected_after=2.5)
        rows.append(row)
    ties = D.build_alignment_data(rows, mix_ratio="1:0:0", holdout=0.0, seed=0).stats["ties"]["train"]
    assert ties == {"groups": 20, "single_response": 0, "multi_response": 20, "tied": 15, "tied_share": 0.75}
    by_rating = D.build_alignment_data(rows, mix_ratio="1:0:0", holdout=0.0, seed=0, scores="rating")
    assert by_rating.stats["ties"]["train"]["tied"] == 20
    assert by_rating.stats["scores"] == "rating"
    histogram = D.build_alignment_data(rows, mix_ratio="1:0:0", holdout=0.0).stats["kinds"]["imitation"]["score_histogram"]
    assert histogram == {"1": 30, "2": 5, "3": 5}  # 1.5 and 2.5 rounded half up


LOOP = "The answer is not. " * 8


def test_looping_responses_are_scored_1_and_never_imitated():
    row = record(0, before=6, after=3, ratings=(5, 6))
    row["draft_answer"] = LOOP  # the judge rated the loop 6, the honest revision 3
    imitation = D.mine_record(row)[0]
    [demoted], counts = D.demote_loops([imitation])
    assert demoted.responses == imitation.responses and demoted.scores == (1.0, 3.0)
    assert counts == {"max_repeated": 0.3, "demoted": 1, "loops_dropped": 0, "groups_dropped": 0}
    [kept], _ = D.demote_loops([imitation], max_repeated=1.0)  # 1 keeps every response as rated
    assert kept.scores == (6.0, 3.0)


def test_a_loop_that_would_tie_for_best_is_dropped_and_a_group_of_loops_too():
    tie = D.AlignmentGroup("q", (LOOP, "Be kind."), (7.0, 1.0), "imitation")
    only_loops = D.AlignmentGroup("q2", (LOOP, LOOP + "again"), (7.0, 6.0), "imitation")
    clean = D.AlignmentGroup("q3", ("Be kind.", "Ignore them."), (5.0, 2.0), "imitation")
    out, counts = D.demote_loops([tie, only_loops, clean])
    assert [g.responses for g in out] == [("Be kind.",), ("Be kind.", "Ignore them.")]
    assert out[1] is clean
    assert counts == {"max_repeated": 0.3, "demoted": 0, "loops_dropped": 1, "groups_dropped": 1}
    with pytest.raises(ValidationError, match="max_repeated"):
        D.demote_loops([clean], max_repeated=1.5)


def test_build_and_cli_report_looping_responses(tmp_path):
    from typer.testing import CliRunner

    from stablealign_app.cli.main import app

    rows = [record(i) for i in range(10)]
    for row in rows[:4]:
        row["revised_answer"] = LOOP
    stats = D.build_alignment_data(rows, mix_ratio="1:0:0", holdout=0.0).stats
    assert stats["loops"]["demoted"] == 8  # counted as mined: each looping revision is in an imitation and a realignment group
    records = _write(tmp_path, "records.jsonl", rows)
    out = tmp_path / "alignment.jsonl"
    result = CliRunner().invoke(app, ["data", "build", "--records", str(records), "--out", str(out), "--mix", "1:0:0",
                                      "--holdout", "0"])
    assert result.exit_code == 0, result.output
    assert "looping responses" in result.output and "8 scored 1" in result.output
    trained_on = D.load_alignment_groups(out)
    assert all(max(g.scores) > 1 and not loops(g.responses[g.scores.index(max(g.scores))]) for g in trained_on)
    off = CliRunner().invoke(app, ["data", "build", "--records", str(records), "--out", str(out), "--mix", "1:0:0",
                                   "--holdout", "0", "--max-repeated", "1"])
    assert off.exit_code == 0 and "looping responses" not in off.output


CRITIQUE = "Your answer is not helpful to the conversation, and it doesn't meet the given criteria."


def test_responses_that_speak_of_an_answer_are_scored_1_where_an_answer_is_asked_for():
    from stablealign.training.critiques import speaks_of_an_answer

    assert speaks_of_an_answer(CRITIQUE) and speaks_of_an_answer("I think my previous response was rude.")
    assert speaks_of_an_answer("Agent 3's answer misses the point.")
    assert not speaks_of_an_answer("Talk to them calmly; answers come when people feel heard.")
    imitation = D.AlignmentGroup("q", (CRITIQUE, "Be kind."), (6.0, 3.0), "imitation")
    realignment = D.AlignmentGroup("q2", ("Be kind to them.", CRITIQUE), (5.0, 6.5), "realignment")
    critic = D.AlignmentGroup("q3", (CRITIQUE, "Fine."), (6.0, 2.0), "self_critic")  # feedback is asked for here
    only = D.AlignmentGroup("q4", (CRITIQUE, "The response is rude."), (6.0, 5.0), "imitation")
    tie = D.AlignmentGroup("q5", (CRITIQUE, "Ignore them."), (6.0, 1.0), "imitation")
    out, counts = D.demote_critiques([imitation, realignment, critic, only, tie])
    assert [g.scores for g in out] == [(1.0, 3.0), (5.0, 1.0), (6.0, 2.0), (1.0,)]
    assert out[2] is critic and out[3].responses == ("Ignore them.",)
    assert counts == {"demoted": 2, "dropped": 1, "groups_dropped": 1}


def test_build_and_cli_report_critiques_and_keep_them_when_asked(tmp_path):
    from typer.testing import CliRunner

    from stablealign_app.cli.main import app

    rows = [record(i) for i in range(10)]
    for row in rows[:3]:
        row["revised_answer"] = CRITIQUE
    stats = D.build_alignment_data(rows, mix_ratio="1:0:0", holdout=0.0).stats
    assert stats["critiques"]["demoted"] == 6  # each revision is in an imitation and a realignment group
    assert D.build_alignment_data(rows, mix_ratio="1:0:0", holdout=0.0, critiques=False).stats["critiques"] is None
    records = _write(tmp_path, "records.jsonl", rows)
    out = tmp_path / "alignment.jsonl"
    args = ["data", "build", "--records", str(records), "--out", str(out), "--mix", "1:0:0", "--holdout", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "speak of an answer" in result.output and "6 scored 1" in result.output
    assert all(CRITIQUE not in g.responses or min(g.scores) == 1.0 for g in D.load_alignment_groups(out))
    kept = CliRunner().invoke(app, [*args, "--keep-critiques"])
    assert kept.exit_code == 0 and "kept as rated" in kept.output
    assert any(CRITIQUE == g.responses[g.scores.index(max(g.scores))] for g in D.load_alignment_groups(out))
