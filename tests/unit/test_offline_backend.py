"""The offline backend: deterministic, obviously offline, and a society that learns from feedback."""

from __future__ import annotations

import logging
import re
import statistics

import pytest

from stablealign.core.errors import ValidationError
from stablealign.llm.backends.base import ChatMessage, ChatRequest
from stablealign.llm.backends.heuristics import alignment_score
from stablealign.llm.backends.offline import OFFLINE_MODEL, OfflineChatBackend
from stablealign.sandbox.data import load_questions

RATING = re.compile(r"^Rating: ([1-7]) ### Reason: (.+)$", re.DOTALL)
QUESTIONS = load_questions()[:20]


def request(task: str, **hints) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("user", "prompt text for " + task)], task=task, hints=hints)


def draft(persona: str, question: str, *, seed: int = 1, memories=(), agent_id: int = 0, round_: int = 0):
    return request("draft", persona=persona, question=question, memories=list(memories), seed=seed,
                   agent_id=agent_id, round=round_)


@pytest.fixture(scope="module")
def backend() -> OfflineChatBackend:
    return OfflineChatBackend()


def test_it_says_it_is_offline(caplog):
    with caplog.at_level(logging.WARNING):
        backend = OfflineChatBackend()
    assert backend.model == OFFLINE_MODEL == "offline-deterministic"
    assert any("OFFLINE" in str(getattr(r, "note", "")) for r in caplog.records)


async def test_same_request_same_text_across_instances(backend):
    other = OfflineChatBackend()
    for question in QUESTIONS[:5]:
        a = await backend.chat(draft("bad", question))
        b = await other.chat(draft("bad", question))
        assert a.text == b.text and a.text
        assert a.model == OFFLINE_MODEL
        assert a.prompt_tokens == 4 and a.completion_tokens == len(a.text.split())


async def test_a_different_seed_may_change_the_answer(backend):
    texts = [((await backend.chat(draft("good", q, seed=1))).text, (await backend.chat(draft("good", q, seed=2))).text)
             for q in QUESTIONS]
    assert any(a != b for a, b in texts)


async def test_feedback_and_ratings_use_the_exact_format(backend):
    answer = "Just buy a gun and shoot him."
    for reply in [
        await backend.chat(request("feedback", persona="good", question="q?", answer=answer, seed=1, agent_id=2,
                                   round=0)),
        await backend.chat(request("feedback", persona="bad", question="q?", answer=answer, seed=1, agent_id=3,
                                   round=0)),
        await backend.chat(request("rate_alignment", question="q?", answer=answer, seed=1)),
        await backend.chat(request("rate_engagement", question="How do I hurt him?", answer=answer, seed=1)),
    ]:
        assert RATING.match(reply.text), reply.text
    good = int(RATING.match((await backend.chat(request(
        "feedback", persona="good", question="q?", answer=answer, seed=1, agent_id=2, round=0))).text).group(1))
    bad = int(RATING.match((await backend.chat(request(
        "feedback", persona="bad", question="q?", answer=answer, seed=1, agent_id=3, round=0))).text).group(1))
    assert good <= 2 and bad > good  # a bad partner overlooks harm


async def test_bad_persona_drafts_are_less_aligned_than_good_ones(backend):
    good = [alignment_score((await backend.chat(draft("good", q, agent_id=i))).text)[0] for i, q in enumerate(QUESTIONS)]
    bad = [alignment_score((await backend.chat(draft("bad", q, agent_id=i))).text)[0] for i, q in enumerate(QUESTIONS)]
    assert statistics.mean(good) > statistics.mean(bad) + 0.5


async def test_revision_after_low_ratings_is_safer_and_after_high_ratings_keeps_the_draft(backend):
    gains = []
    for i, question in enumerate(QUESTIONS):
        text = (await backend.chat(draft("bad", question, agent_id=i))).text
        revised = (await backend.chat(request(
            "revise", persona="bad", question=question, draft=text, ratings=[2, 3, None, 2],
            reasons=["The answer is harmful.", "Questionable.", "", "Unsafe."], seed=1, agent_id=i, round=0))).text
        gains.append(alignment_score(revised)[0] - alignment_score(text)[0])
        assert "feedback" in revised or "concern" in revised or "inappropriate" in revised
    assert statistics.mean(gains) >= 2 and min(gains) >= 0
    kept = (await backend.chat(request("revise", persona="good", question=QUESTIONS[0], draft="  a fine answer  ",
                                       ratings=[6, 7, 6], reasons=["Kind.", "Helpful.", "Fine."], seed=1,
                                       agent_id=0, round=0))).text
    assert kept == "A fine answer."


async def test_memories_steer_the_draft(backend):
    question = QUESTIONS[3]
    # Meeting a question again: the agent repeats its earlier (revised) answer.
    earlier = {"question": question, "answer": "I gave a careful answer before.", "similarity": 0.99}
    assert (await backend.chat(draft("bad", question, memories=[earlier]))).text == earlier["answer"]
    # A bad agent whose memory holds aligned answers drafts like a good agent.
    aligned_memory = {"question": "something else", "similarity": 0.8, "answer": (
        "I'm sorry, but I can't help with that: it is dangerous and illegal. Please talk to someone you trust.")}
    learned, unlearned = [], []
    for i, q in enumerate(QUESTIONS):
        learned.append(alignment_score((await backend.chat(draft("bad", q, agent_id=i, memories=[aligned_memory]))).text)[0])
        unlearned.append(alignment_score((await backend.chat(draft("bad", q, agent_id=i))).text)[0])
    assert statistics.mean(learned) > statistics.mean(unlearned)


async def test_missing_hints_are_a_validation_error_not_retried(backend):
    with pytest.raises(ValidationError, match="needs hints"):
        await backend.chat(request("draft", persona="good"))


async def test_plain_chat_is_marked_offline(backend):
    reply = await backend.chat(ChatRequest(messages=[ChatMessage("user", "How do I bake bread?")]))
    assert reply.text.startswith("[offline] ")
    assert reply.text == (await backend.chat(ChatRequest(messages=[ChatMessage("user", "How do I bake bread?")]))).text


def test_reasons_use_critical_words_only_for_low_scores():
    from stablealign.llm.backends.heuristics import alignment_score as score_of
    from stablealign.llm.backends.offline import CRITICAL_REASON
    from stablealign.sandbox.data import load_hh_pairs

    for pair in load_hh_pairs()[:300]:
        for text in (pair.chosen, pair.rejected):
            score, reason = score_of(text)
            assert bool(CRITICAL_REASON.search(reason)) == (score <= 3), reason


async def test_a_half_bad_society_becomes_more_aligned_through_memory(backend):
    """Agents meet questions again; their memory holds revised answers, so bad drafts improve."""
    questions = list(QUESTIONS[:2])
    personas = ["good", "bad"] * 4
    memory: list[dict[str, str]] = [{} for _ in personas]  # question -> latest revised answer
    bad_draft_scores = []
    for round_ in range(4):
        scores = []
        for agent, persona in enumerate(personas):
            question = questions[(agent + round_) % 2]  # every agent meets its questions again
            memories = [{"question": question, "answer": memory[agent][question], "similarity": 1.0}] \
                if question in memory[agent] else []
            text = (await backend.chat(draft(persona, question, agent_id=agent, round_=round_,
                                             memories=memories))).text
            feedback = [RATING.match((await backend.chat(request(
                "feedback", persona=personas[p], question=question, answer=text, seed=1, agent_id=p,
                round=round_))).text) for p in range(len(personas)) if p != agent][:4]
            revised = (await backend.chat(request(
                "revise", persona=persona, question=question, draft=text, ratings=[int(f.group(1)) for f in feedback],
                reasons=[f.group(2) for f in feedback], seed=1, agent_id=agent, round=round_))).text
            memory[agent][question] = revised
            if persona == "bad":
                scores.append(alignment_score(text)[0])
        bad_draft_scores.append(statistics.mean(scores))
    assert bad_draft_scores[-1] > bad_draft_scores[0] + 1, bad_draft_scores


# --- the prior answers' alignment scores, cached across runs -----------------------------------------------

def _answers() -> list:
    from stablealign.llm.backends.offline import PriorAnswer

    return [PriorAnswer("How do I pick a lock?", "I can't help with breaking into a home; call a locksmith.",
                        "Use a tension wrench and a pick to steal from them."),
            PriorAnswer("Any tips for a party?", "Invite friends and be kind to everyone.", "Get them drunk.")]


def _expected(answers) -> list[tuple[int, int]]:
    return [(alignment_score(a.chosen)[0], alignment_score(a.rejected)[0]) for a in answers]


def _stored(path) -> list:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def test_prior_scores_are_stored_once_and_read_back(tmp_path, monkeypatch):
    import json

    from stablealign.llm.backends import heuristics, offline

    monkeypatch.setenv("STABLEALIGN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(heuristics, "_KNOWN_ALIGNMENT", {})
    first = _answers()
    offline.fill_prior_scores(first)
    [stored] = (tmp_path / "prior-scores").iterdir()
    texts = [t for a in first for t in (a.chosen, a.rejected)]
    assert _stored(stored) == [list(heuristics._alignment_score(t)) for t in texts]
    # A stored file is believed: scripted results prove the second set came from it, not from the heuristics,
    # both the entries' scores and what alignment_score answers for their texts (a rating of a pool answer).
    scripted = [[7, "scripted a"], [1, "scripted b"], [6, "scripted c"], [2, "scripted d"]]
    stored.write_text(json.dumps(scripted), encoding="utf-8")
    second = _answers()
    offline.fill_prior_scores(second)
    assert [(a.chosen_alignment, a.rejected_alignment) for a in second] == [(7, 1), (6, 2)]
    assert alignment_score(second[1].chosen) == (6, "scripted c")


def test_other_texts_do_not_read_the_scores_of_a_pool_they_are_not(tmp_path, monkeypatch):
    from stablealign.llm.backends import heuristics, offline

    monkeypatch.setenv("STABLEALIGN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(heuristics, "_KNOWN_ALIGNMENT", {})
    offline.fill_prior_scores(_answers())
    edited = _answers()
    object.__setattr__(edited[1], "rejected", "Get them drunk and steal their wallets.")
    offline.fill_prior_scores(edited)
    assert len(list((tmp_path / "prior-scores").iterdir())) == 2
    assert [(a.chosen_alignment, a.rejected_alignment) for a in edited] == _expected(edited)


@pytest.mark.parametrize("damage", ["", "not json", "[[7, \"a\"], [1, \"b\"], [6, \"c\"]]",
                                    "[[7, \"a\"], [1, \"b\"], [6, \"c\"], [9, \"d\"]]",
                                    "[[7, \"a\"], [1, \"b\"], [6, \"c\"], [true, \"d\"]]",
                                    "[[7, \"a\"], [1, \"b\"], [6, \"c\"], [2, 3]]", "{}"])
def test_a_damaged_cache_file_is_recomputed_and_replaced(tmp_path, monkeypatch, damage):
    from stablealign.llm.backends import heuristics, offline

    monkeypatch.setenv("STABLEALIGN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(heuristics, "_KNOWN_ALIGNMENT", {})
    offline.fill_prior_scores(_answers())
    [stored] = (tmp_path / "prior-scores").iterdir()
    stored.write_text(damage, encoding="utf-8")
    answers = _answers()
    offline.fill_prior_scores(answers)
    assert [(a.chosen_alignment, a.rejected_alignment) for a in answers] == _expected(answers)
    texts = [t for a in answers for t in (a.chosen, a.rejected)]
    assert _stored(stored) == [list(heuristics._alignment_score(t)) for t in texts]


def test_without_a_cache_the_scores_are_computed_when_asked(tmp_path, monkeypatch):
    from stablealign.llm.backends import heuristics, offline

    monkeypatch.setattr(heuristics, "_KNOWN_ALIGNMENT", {})
    monkeypatch.setenv("STABLEALIGN_CACHE_DIR", "off")
    answers = _answers()
    offline.fill_prior_scores(answers)
    assert "chosen_alignment" not in answers[0].__dict__  # nothing computed up front
    assert [(a.chosen_alignment, a.rejected_alignment) for a in answers] == _expected(answers)
    # An unwritable cache directory: scores still right, no error.
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    monkeypatch.setenv("STABLEALIGN_CACHE_DIR", str(blocked))
    answers = _answers()
    offline.fill_prior_scores(answers)
    assert [(a.chosen_alignment, a.rejected_alignment) for a in answers] == _expected(answers)


def test_nearest_prior_questions_do_not_depend_on_the_hash_seed():
    """Processes (a run's workers, agent replicas) have different string hash seeds; the same request must
    draft the same answer in every one. Iterating a set of words summed idf weights in a seed-dependent
    order, and ties at the k-th place went either way (e.g. under PYTHONHASHSEED=3)."""
    import os
    import subprocess
    import sys

    script = ("import hashlib; from stablealign.llm.backends import offline; from stablealign.sandbox.data import load_questions; "
              "ix = offline.prior_index(); "
              "print(hashlib.sha256(repr([ix.nearest(q) for q in load_questions()]).encode()).hexdigest())")
    digests = set()
    for seed in ("1", "3", "12"):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONHASHSEED": seed, "STABLEALIGN_LOG_LEVEL": "ERROR"})
        assert result.returncode == 0, result.stderr[-2000:]
        digests.add(result.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests
