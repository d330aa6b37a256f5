"""The judge's agreement with human preference: arithmetic where the answer is known, the rating
prompts' readings (an inverted scale, mixed prompts), and clear results for ties, missing ratings
and empty input."""

from __future__ import annotations

import asyncio

import pytest

from stablealign.core.errors import ValidationError
from stablealign.llm import judges
from stablealign.llm.backends.base import ChatBackend, ChatRequest, Completion, DigitDistribution
from stablealign.sandbox.stats import win


class LengthJudgeBackend(ChatBackend):
    """A deterministic judge that rates an answer by its length alone: shorter is rated higher.
    It reads the answer from the request's hints (as the offline backend does) and answers in the
    rating format, turned around when the prompt asks how *harmful* an answer is."""

    name = "length-judge"

    def __init__(self) -> None:
        super().__init__("length-judge")
        self.requests: list[ChatRequest] = []

    @staticmethod
    def rating(answer: str) -> int:
        return 7 - min(6, len(answer) // 80)

    async def _chat_once(self, request: ChatRequest) -> Completion:
        self.requests.append(request)
        score = self.rating(request.hints["answer"])
        if "How harmful" in request.messages[-1].content:
            score = 8 - score
        return Completion(text=f"Rating: {score} ### Reason: length", model=self.model)


def run_judge(variant: str, pairs: list[judges.JudgePair]) -> tuple[dict, LengthJudgeBackend]:
    backend = LengthJudgeBackend()
    judge = judges.LLMJudge(judges.get_variant(variant), backend)
    return asyncio.run(judges._agreement_of(judge, pairs)), backend


def test_a_judge_rating_by_length_gets_what_length_alone_gives():
    pairs = judges.judge_pairs("prior", 200)
    expected = [win(LengthJudgeBackend.rating(p.chosen), LengthJudgeBackend.rating(p.rejected)) for p in pairs]
    result, backend = run_judge("llm-expected", pairs)
    assert result["agreement"] == pytest.approx(sum(expected) / len(expected))
    assert result["items"] == expected and result["scored"] == 200 and result["missing"] == 0
    assert result["ties"] == sum(w == 0.5 for w in expected) > 0
    lo, hi = result["ci95"]
    assert lo <= result["agreement"] <= hi
    # Each answer is rated on its own, with the question it responds to, and no reason is asked for.
    assert len(backend.requests) == 400 and not any(r.rating_reason for r in backend.requests)
    assert backend.requests[0].hints == {"question": pairs[0].question, "answer": pairs[0].chosen}
    # The "how harmful" prompt's scale runs the other way: read inverted, the judge agrees the same.
    inverted, _ = run_judge("llm-harm", pairs)
    assert inverted["items"] == expected


def test_judge_pairs_come_from_the_split_asked_for_with_the_last_human_turn():
    from stablealign.sandbox.data import hh_split_of, load_hh_pairs

    eval_pairs = judges.judge_pairs("eval", 50)
    assert len(eval_pairs) == 50
    source = load_hh_pairs(None, "eval")[:50]
    assert all(hh_split_of(p.question) == "eval" for p in source)
    assert [p.chosen for p in eval_pairs] == [p.chosen for p in source]
    multi = next(p for p in source if p.chosen_dialogue.count("Human:") > 1)
    assert next(j for j in eval_pairs if j.chosen == multi.chosen).question != multi.question  # the last turn
    with pytest.raises(ValidationError, match="unknown HH-RLHF split"):
        judges.judge_pairs("test")
    with pytest.raises(ValidationError, match=">= 1"):
        judges.judge_pairs("eval", 0)


def test_agreement_counts_ties_half_and_leaves_missing_ratings_out():
    result = judges.agreement([5.0, 3.0, 4.0, None, 6.0], [2.0, 3.0, 6.0, 1.0, None])
    assert result["items"] == [1.0, 0.5, 0.0]
    assert result["agreement"] == pytest.approx(0.5)
    assert (result["pairs"], result["scored"], result["missing"], result["ties"]) == (5, 3, 2, 1)
    all_ties = judges.agreement([4.0] * 10, [4.0] * 10)
    assert all_ties["agreement"] == 0.5 and all_ties["ci95"] == [0.5, 0.5] and all_ties["ties"] == 10


def test_no_scored_pair_is_a_clear_result_not_a_number():
    empty = judges.agreement([], [])
    assert empty["agreement"] is None and empty["error"] == "no pairs to score"
    unrated = judges.agreement([None, 3.0], [2.0, None])
    assert unrated["agreement"] is None and unrated["error"] == "no pair has both ratings"
    assert unrated["missing"] == 2
    with pytest.raises(ValidationError, match="2 chosen but 1 rejected"):
        judges.agreement([1.0, 2.0], [1.0])


def test_mixed_prompts_average_distributions_turning_inverted_ones_around():
    kind = DigitDistribution((0.5, 0.5, 0, 0, 0, 0, 0))  # ratings 1-2 on a 7 = aligned scale
    harm = DigitDistribution((0, 0, 0, 0, 0, 0, 1.0))  # 7 on a 7 = harmful scale: 1 once turned around
    mixed = judges._mixture([(kind, False), (harm, True)])
    assert mixed.probabilities == pytest.approx((0.75, 0.25, 0, 0, 0, 0, 0))
    assert mixed.score == 1 and mixed.expected == pytest.approx(1.25)


def test_judge_names_and_defaults():
    assert judges.default_variant("hf") == judges.default_variant("offline") == judges.DEFAULT_VARIANT
    assert judges.DEFAULT_VARIANT == "llm-expected"
    assert judges.default_variant(None) == judges.CPU_JUDGE == "probe"  # the probe needs no observer
    with pytest.raises(ValidationError, match="unknown judge 'gpt-judge'"):
        judges.get_variant("gpt-judge")
    with pytest.raises(ValidationError, match="asks a chat model"):
        judges.make_judge("llm-expected", None)
    rating = judges.JudgeRating(3, None)
    assert rating.value("expected") == 3.0 and judges.JudgeRating(None).value() is None
    assert judges.JudgeRating(3, 3.4).value("argmax") == 3.0
