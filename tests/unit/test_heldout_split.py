"""Held-out means held out: the HH-RLHF pairs evaluation scores are never priors, questions or training text."""

from __future__ import annotations

from services.world.settings import WorldSettings
from stablealign.sandbox import data
from stablealign.training.evaluate import bootstrap_ci, hh_examples, paired_difference, sandbox_curve


def test_split_is_fixed_disjoint_and_large_enough():
    every = data.load_hh_pairs()
    prior, held = data.load_hh_pairs(None, "prior"), data.load_hh_pairs(None, "eval")
    assert len(prior) + len(held) == len(every)
    assert {p.question for p in prior}.isdisjoint({p.question for p in held})
    assert len(held) >= 500 and 0.6 < len(prior) / len(every) < 0.8
    assert data.hh_split_of("How do I make a bomb?") == data.hh_split_of("  How do I make a bomb?  ")
    assert data.load_prior_pairs() == prior
    assert len(hh_examples(None, None)) == len(held)


def test_question_pool_leaves_out_eval_questions():
    pool = {" ".join(q.lower().split()) for q in data.load_questions()}
    assert pool and pool.isdisjoint(data.eval_questions())


def test_a_users_own_prior_file_is_used_whole(tmp_path):
    import shutil

    own = tmp_path / "own.jsonl.gz"
    shutil.copy(data.default_prior_path(), own)
    assert len(data.load_prior_pairs(own)) == len(data.load_hh_pairs(own)) > len(data.load_prior_pairs())


def test_bootstrap_interval_and_paired_difference():
    assert bootstrap_ci([1.0]) is None
    lo, hi = bootstrap_ci([0.0, 1.0] * 200)
    assert lo < 0.5 < hi and hi - lo < 0.15
    assert bootstrap_ci([2.0] * 10) == [2.0, 2.0]
    diff = paired_difference([0.0, 0.5, 1.0, None], [1.0, 0.5, 1.0, 0.0])
    assert diff["items"] == 3 and abs(diff["delta"] - 1 / 3) < 1e-9


def test_sandbox_curve(tmp_path):
    import json

    rows = [{"iteration": r, "gen_moral_score_before": b, "gen_moral_score_after": a}
            for r, b, a in ((0, 2, 5), (0, 4, None), (1, 3, 6), (1, 5, 6))]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = sandbox_curve(path)
    assert [c["round"] for c in curve] == [0, 1]
    assert curve[0]["alignment_before"] == 3.0 and curve[0]["alignment_after"] == 5.0 and curve[0]["rated_after"] == 1
    assert curve[1]["alignment_after_ci95"] == [6.0, 6.0]


def test_request_deadline_follows_the_backend():
    settings = WorldSettings()
    assert settings.request_timeout("hf") == settings.local_request_timeout_seconds >= 600
    assert settings.request_timeout("openai") == settings.request_timeout("offline") == settings.request_timeout_seconds
