"""Evaluation measures where the answer is known: the reference-normalised preference accuracy,
the collapse guard, and the differences a report holds."""

from __future__ import annotations

import pytest

from stablealign.training import evaluate as E


def pref(chosen: list[float], rejected: list[float]) -> dict:
    return {"logprob_chosen": chosen, "logprob_rejected": rejected}


def test_a_model_against_itself_is_exactly_one_half():
    base = pref([-10.0, -20.0, -5.0], [-12.0, -3.0, -5.0])
    result = E.reference_normalised_accuracy(base, base)
    assert result["accuracy"] == 0.5 and result["ties"] == 3 and result["ci95"] == [0.5, 0.5]


def test_gains_on_chosen_above_gains_on_rejected_count_as_wins():
    base = pref([-10.0, -10.0, -10.0, -10.0], [-10.0, -10.0, -10.0, -10.0])
    trained = pref([-8.0, -12.0, -9.0, -9.0], [-9.0, -11.0, -9.0, -8.0])
    # gains: chosen +2, -2, +1, +1; rejected +1, -1, +1, +2 -> win, loss, tie, loss
    result = E.reference_normalised_accuracy(base, trained)
    assert result["items"] == [1.0, 0.0, 0.5, 0.0]
    assert result["accuracy"] == pytest.approx(0.375)
    assert result["mean_margin"] == pytest.approx((1 - 1 + 0 - 1) / 4)
    # Raw accuracy could not see it: the trained model still prefers the rejected answer in pair 4.
    assert trained["logprob_chosen"][3] < trained["logprob_rejected"][3]


def test_per_token_gains_take_the_length_lean_out_of_the_summed_ones():
    # A long rejected answer (40 tokens) gains more in sum, less per token, than a short chosen one (5).
    base = {**pref([-10.0, -10.0], [-50.0, -10.0]), "tokens_chosen": [5, 5], "tokens_rejected": [40, 5]}
    trained = {**pref([-9.0, -9.0], [-48.0, -9.0]), "tokens_chosen": [5, 5], "tokens_rejected": [40, 5]}
    result = E.reference_normalised_accuracy(base, trained)
    assert result["items"] == [0.0, 0.5]  # summed: +1 against +2, then a tie
    per_token = result["per_token"]
    assert per_token["items"] == [1.0, 0.5] and per_token["accuracy"] == pytest.approx(0.75)
    assert per_token["mean_margin"] == pytest.approx((1 / 5 - 2 / 40) / 2)
    assert "per_token" not in E.reference_normalised_accuracy(pref([-1.0], [-2.0]), pref([-1.0], [-3.0]))


def test_two_trainings_of_one_base_compare_paired_on_their_gains():
    base = {"preference": {**pref([-10.0] * 4, [-10.0] * 4), "tokens_chosen": [4] * 4, "tokens_rejected": [4] * 4}}
    # gains (chosen, rejected): stable alignment wins 3 pairs of 4, sft-only 1 of 4
    stable = {"preference": {**pref([-8.0, -8.0, -8.0, -12.0], [-9.0, -9.0, -9.0, -9.0]),
                             "tokens_chosen": [4] * 4, "tokens_rejected": [4] * 4}}
    sft = {"preference": {**pref([-8.0, -12.0, -12.0, -12.0], [-9.0, -9.0, -9.0, -9.0]),
                          "tokens_chosen": [4] * 4, "tokens_rejected": [4] * 4}}
    stable_vs_base, sft_vs_base = E.differences(base, stable), E.differences(base, sft)
    versus = E.trained_versus(stable, sft, stable_vs_base, sft_vs_base)
    assert versus["reference_normalised_accuracy"]["delta"] == pytest.approx(0.75 - 0.25)
    assert versus["reference_normalised_per_token"]["delta"] == pytest.approx(0.5)
    assert E.trained_versus(sft, sft, sft_vs_base, sft_vs_base)["reference_normalised_accuracy"]["delta"] == 0.0


def test_reference_normalised_needs_the_same_pairs():
    assert E.reference_normalised_accuracy(pref([-1.0], [-2.0]), pref([-1.0, -2.0], [-2.0, -1.0])) is None
    assert E.reference_normalised_accuracy({}, pref([-1.0], [-2.0])) is None
    assert E.reference_normalised_accuracy(pref([], []), pref([], [])) is None


@pytest.mark.parametrize("text,share", [
    ("", 0.0),
    ("be kind to them", 0.0),
    ("sorry sorry sorry sorry sorry", 2 / 3),  # 3 trigrams, all the same
    ("I am sorry. I am sorry. I am sorry.", 4 / 7),  # 7 trigrams, 3 different
])
def test_repeated_share(text, share):
    assert E.repeated_share(text) == pytest.approx(share)


class WordTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(range(len(text.split())))}


def test_answer_guard_sees_a_collapsed_model():
    healthy = E.answer_guard(["Talk to them calmly about it.", "Ask a doctor before you take it."], WordTokenizer())
    collapsed = E.answer_guard(["no no no no no no no no", ""], WordTokenizer())
    assert healthy["length_tokens"] == pytest.approx(6.5) and healthy["repeated_share"] == 0.0
    assert collapsed["empty"] == 1 and collapsed["repeated_share"] > 0.4
    assert collapsed["repeated_items"][1] == 0.0 and collapsed["length_items"] == [8.0, 0.0]


def test_differences_pair_every_measure_and_name_the_reference_normalised_accuracy():
    base = {"preference": {"items": [1.0, 0.0], "chosen_nll_items": [2.0, 3.0], **pref([-4.0, -6.0], [-5.0, -5.0])},
            "heldout": {"items": [1.5, 2.5]}, "alignment": {"items": [2.0, 3.0], "expected_items": [2.5, 3.5]},
            "guard": {"length_items": [10.0, 20.0], "repeated_items": [0.0, 0.1]}}
    trained = {"preference": {"items": [1.0, 1.0], "chosen_nll_items": [1.5, 2.5], **pref([-3.0, -5.0], [-5.0, -6.0])},
               "heldout": {"items": [1.0, 2.0]}, "alignment": {"items": [3.0, None], "expected_items": [3.5, 4.5]},
               "guard": {"length_items": [12.0, 18.0], "repeated_items": [0.0, 0.3]}}
    diff = E.differences(base, trained)
    assert diff["preference_accuracy"]["delta"] == pytest.approx(0.5)
    assert diff["alignment"]["delta"] == pytest.approx(1.0) and diff["alignment"]["items"] == 2
    assert diff["alignment_rating"] is None  # one pair with both ratings: no interval, no figure
    assert diff["chosen_nll"]["delta"] == pytest.approx(-0.5)
    assert diff["answer_length"]["delta"] == pytest.approx(0.0)
    assert diff["reference_normalised_accuracy"]["accuracy"] == 1.0


def test_figures_print_with_their_interval_or_a_dash():
    from stablealign.sandbox.stats import format_figure

    assert format_figure(0.6371, [0.58, 0.6904]) == "0.637 [0.580, 0.690]"
    assert format_figure(4.25, None, 2) == "4.25"
    assert format_figure(None, [0.1, 0.2]) == "-" and format_figure(True) == "-"


def test_the_guarded_judge_rates_answers_that_loop_at_the_floor():
    from stablealign.v1 import common_pb2

    answers = ["Talk to them calmly and listen to what they need.", "The answer is not. " * 8]
    questions = ["How do I calm a friend down?", "Is it fine to lie to my boss?"]
    rated = E.alignment_rating(answers, questions, common_pb2.ModelRef(backend="offline"), judge="llm-expected")
    assert rated["loops"] == 1 and rated["guarded_items"][1] == 1.0
    assert rated["guarded_items"][0] == rated["expected_items"][0] is not None
    assert rated["guarded_mean"] == pytest.approx((rated["expected_items"][0] + 1.0) / 2)
    critique = E.alignment_rating(["Your answer is not helpful to the conversation."], questions[:1],
                                  common_pb2.ModelRef(backend="offline"), judge="llm-expected")
    assert critique["critiques"] == 1 and critique["loops"] == 0 and critique["guarded_items"] == [1.0]
    diff = E.differences({"alignment": {"guarded_items": [4.0, 5.0, 3.0]}}, {"alignment": {"guarded_items": [1.0, 5.0, 4.0]}})
    assert diff["alignment_guarded"]["delta"] == pytest.approx(-2 / 3)
