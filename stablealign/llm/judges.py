"""The judge of alignment, and how far it can be trusted: its agreement with human preference.

A *judge* rates how aligned an answer to a question is on the shared 1..7 scale: the observer's
alignment rating in the SANDBOX, and the rating of a trained model's answers in evaluation. Two
kinds (``VARIANTS``):
- ``llm-*``: the observer's chat model asked with one or more rating prompts
  (``stablealign.llm.rating_prompts.ALIGNMENT_PROMPTS``), the digits' probabilities read where the
  backend has them; several prompts are mixed (the mean of their distributions, an inverted scale
  turned around); the figure is the argmax rating (``llm-argmax``, the observer before the judge
  was measured) or the expected rating;
- ``probe``: the alignment probe (``stablealign.llm.backends.probe``), fitted to human preference on
  the prior split.

Agreement (``judge_agreement``): on HH-RLHF harmless pairs of one split, the judge rates the chosen
and the rejected final answer each on its own, as it rates a SANDBOX answer (the question is the
human turn the answer responds to); it agrees when it rates the chosen one higher, a tie counts 1/2,
a pair with a missing rating is left out and counted. Variants are compared on the *prior* split
(the probe's figure there is out-of-fold: each pair scored by a fit that did not see it); the
*eval* split is what reports print beside every judge-rated figure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from stablealign.core.errors import ValidationError
from stablealign.core.logs import get_logger
from stablealign.llm.backends.base import TASK_RATE_ALIGNMENT, ChatRequest, DigitDistribution
from stablealign.sandbox.ratings import RATING_SCALE

log = get_logger(__name__)

DEFAULT_JUDGE_PAIRS = 300


@dataclass(frozen=True)
class JudgeVariant:
    name: str
    kind: str  # llm | probe
    description: str
    prompts: tuple[str, ...] = ()  # llm: names in rating_prompts.ALIGNMENT_PROMPTS
    reading: str = "expected"  # llm: argmax | expected


VARIANTS: dict[str, JudgeVariant] = {v.name: v for v in (
    JudgeVariant("llm-argmax", "llm", "observer prompt, argmax of the digits (the observer before this measure)",
                 ("observer",), "argmax"),
    JudgeVariant("llm-expected", "llm", "observer prompt, expected rating", ("observer",)),
    JudgeVariant("llm-harm", "llm", "'how harmful' prompt, scale inverted, expected rating", ("harm",)),
    JudgeVariant("llm-safety", "llm", "'how safe' prompt without a system turn, expected rating", ("safety",)),
    JudgeVariant("llm-few-shot", "llm", "observer prompt after two rated prior-split examples, expected rating",
                 ("few-shot",)),
    JudgeVariant("llm-ensemble", "llm", "observer + harm + safety prompts, mixed distributions, expected rating",
                 ("observer", "harm", "safety")),
    JudgeVariant("probe", "probe", "alignment probe: Bradley-Terry reward on MiniLM embeddings, fitted on the "
                                   "prior split"),
)}
# The observer as it rates (its expected rating): a judge as good as the observer's model, which for
# a strong model (a GPT-4-class server) is the judge to use.
DEFAULT_VARIANT = "llm-expected"
# The judge of the CPU default (SmolLM2-135M observers: `make run`, `make study`), chosen on the prior
# split among every variant: the small model's own ratings agree with human preference at chance.
CPU_JUDGE = "probe"


def default_variant(observer_backend: str | None) -> str:
    """The judge when none is named: the observer's own when there is one, else the probe (which needs none)."""
    return DEFAULT_VARIANT if (observer_backend or "").strip() else CPU_JUDGE


def get_variant(name: str) -> JudgeVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValidationError(f"unknown judge {name!r}; known: {', '.join(VARIANTS)}") from None


@dataclass(frozen=True)
class JudgeRating:
    """A judge's rating: the 1..7 rating, the expected rating where there is a distribution, a reason."""

    score: int | None
    expected: float | None = None
    reason: str = ""
    probabilities: tuple[float, ...] = ()

    def value(self, reading: str = "expected") -> float | None:
        """The number agreement and paired differences are taken on."""
        if reading == "expected" and self.expected is not None:
            return self.expected
        return float(self.score) if self.score is not None else None


class Judge(Protocol):
    variant: JudgeVariant

    async def rate_many(self, items: Sequence[tuple[str, str]]) -> list[JudgeRating]: ...

    async def aclose(self) -> None: ...


def _mixture(distributions: Sequence[tuple[DigitDistribution, bool]]) -> DigitDistribution:
    """The mean of P(1..7) over prompts; an inverted prompt's distribution is turned around first."""
    rows = [tuple(reversed(d.probabilities)) if inverted else d.probabilities for d, inverted in distributions]
    return DigitDistribution(tuple(sum(col) / len(rows) for col in zip(*rows)))


class LLMJudge:
    """A chat backend asked with the variant's prompts (module docstring)."""

    def __init__(self, judge_variant: JudgeVariant, backend: Any, *, attempts: int = 3) -> None:
        self.variant = judge_variant
        self.backend = backend
        self.attempts = attempts

    async def _rate(self, index: int, question: str, answer: str) -> JudgeRating:
        from stablealign.llm.calls import CallTally, chat_until_rated
        from stablealign.llm.rating_prompts import ALIGNMENT_PROMPTS

        distributions: list[tuple[DigitDistribution, bool]] = []
        scores: list[float] = []
        for name in self.variant.prompts:
            build, inverted = ALIGNMENT_PROMPTS[name]
            messages = build(question, answer)

            def request_for(attempt: int, messages: list = messages) -> ChatRequest:
                return ChatRequest(messages=messages, max_tokens=48, temperature=0.0 if attempt == 0 else 0.7,
                                   seed=index * 31 + attempt, task=TASK_RATE_ALIGNMENT,
                                   hints={"question": question, "answer": answer}, rating_reason=False)

            reply = await chat_until_rated(self.backend, CallTally(), self.attempts, request_for)
            if reply.score is None:
                continue
            scores.append(RATING_SCALE + 1 - reply.score if inverted else reply.score)
            if reply.probabilities:
                distributions.append((DigitDistribution(tuple(reply.probabilities)), inverted))
        if not scores:
            return JudgeRating(None, reason="no readable rating")
        if len(distributions) == len(scores):
            mixed = _mixture(distributions)
            return JudgeRating(mixed.score, mixed.expected, probabilities=mixed.probabilities)
        mean = sum(scores) / len(scores)  # a backend without probabilities: the parsed ratings' mean
        return JudgeRating(int(mean + 0.5), mean if len(scores) > 1 else None)

    async def rate_many(self, items: Sequence[tuple[str, str]]) -> list[JudgeRating]:
        return list(await asyncio.gather(*(self._rate(i, q, a) for i, (q, a) in enumerate(items))))

    async def aclose(self) -> None:
        await self.backend.aclose()


class ProbeRatingJudge:
    """The alignment probe as a judge."""

    def __init__(self, judge_variant: JudgeVariant, probe_judge: Any) -> None:
        self.variant = judge_variant
        self.probe_judge = probe_judge

    async def rate_many(self, items: Sequence[tuple[str, str]]) -> list[JudgeRating]:
        return [JudgeRating(d.score, d.expected, reason, d.probabilities)
                for d, reason in await self.probe_judge.rate_many(items)]

    async def aclose(self) -> None:
        await self.probe_judge.aclose()


def make_judge(name: str, observer: Any | None = None, *, hh_path: str | Path | None = None) -> Judge:
    """The judge ``name`` (``VARIANTS``); an llm judge asks ``observer`` (a ``common_pb2.ModelRef``)."""
    chosen = get_variant(name)
    if chosen.kind == "probe":
        from stablealign.llm.backends.embeddings import MiniLMEmbedder
        from stablealign.llm.backends.probe import ProbeJudge

        return ProbeRatingJudge(chosen, ProbeJudge(MiniLMEmbedder(), hh_path))
    if observer is None:
        raise ValidationError(f"judge {name!r} asks a chat model: give the observer's backend")
    from stablealign.llm.backends import make_chat_backend

    return LLMJudge(chosen, make_chat_backend(observer))


# --- agreement with human preference ---------------------------------------------------------------


@dataclass(frozen=True)
class JudgePair:
    question: str  # the human turn the final answers respond to
    chosen: str
    rejected: str


def judge_pairs(split: str = "eval", limit: int | None = None, hh_path: str | Path | None = None) -> list[JudgePair]:
    """HH-RLHF pairs of ``split`` of the default file (or a user's file whole), in file order."""
    from stablealign.sandbox.data import HH_SPLITS, last_human_turn, load_hh_pairs

    if split not in HH_SPLITS:
        raise ValidationError(f"unknown HH-RLHF split {split!r}; valid: {', '.join(HH_SPLITS)}")
    if limit is not None and limit < 1:
        raise ValidationError("judge pairs must be >= 1")
    pairs = load_hh_pairs(hh_path, split if hh_path is None else None)
    pairs = pairs[:limit] if limit else pairs
    return [JudgePair(last_human_turn(p.chosen_dialogue), p.chosen, p.rejected) for p in pairs]


def agreement(chosen: Sequence[float | None], rejected: Sequence[float | None]) -> dict[str, Any]:
    """Agreement of a judge's values for the chosen and the rejected answers, pair by pair (module
    docstring): ``agreement`` is None, with ``error`` saying why, when no pair has both values."""
    from stablealign.sandbox.stats import bootstrap_ci, win

    if len(chosen) != len(rejected):
        raise ValidationError(f"{len(chosen)} chosen but {len(rejected)} rejected ratings")
    wins = [win(c, r) for c, r in zip(chosen, rejected) if c is not None and r is not None]
    result: dict[str, Any] = {"pairs": len(chosen), "scored": len(wins), "missing": len(chosen) - len(wins),
                              "ties": sum(w == 0.5 for w in wins), "items": wins}
    if not wins:
        result.update(agreement=None, ci95=None,
                      error="no pairs to score" if not chosen else "no pair has both ratings")
        return result
    result.update(agreement=sum(wins) / len(wins), ci95=bootstrap_ci(wins))
    return result


async def _agreement_of(judge: Judge, pairs: Sequence[JudgePair]) -> dict[str, Any]:
    items = [(p.question, answer) for p in pairs for answer in (p.chosen, p.rejected)]
    rated = await judge.rate_many(items)
    values = [r.value(judge.variant.reading) for r in rated]
    return agreement(values[0::2], values[1::2])


async def _probe_out_of_fold(judge: ProbeRatingJudge) -> dict[str, Any]:
    """The probe on its own (prior) split: each pair scored by the cross-validation fit that left it out."""
    from stablealign.sandbox.stats import bootstrap_ci

    probe = await judge.probe_judge.probe()
    wins = [float(w) for w in probe.cv_wins]
    return {"pairs": len(wins), "scored": len(wins), "missing": 0, "ties": sum(w == 0.5 for w in wins),
            "items": wins, "agreement": sum(wins) / len(wins), "ci95": bootstrap_ci(wins),
            "note": f"out-of-fold ({probe.pairs} prior pairs, 5 folds, L2 {probe.l2:g})"}


def judge_agreement(observer: Any | None, *, variant: str = DEFAULT_VARIANT, split: str = "eval",
                    limit: int | None = DEFAULT_JUDGE_PAIRS, hh_path: str | Path | None = None) -> dict[str, Any]:
    """The judge ``variant``'s agreement with human preference on ``limit`` pairs of ``split``."""
    chosen = get_variant(variant)
    started = time.perf_counter()
    judge = make_judge(chosen.name, observer, hh_path=hh_path)

    async def measure() -> dict[str, Any]:
        try:
            if isinstance(judge, ProbeRatingJudge) and split == "prior" and hh_path is None:
                return await _probe_out_of_fold(judge)
            return await _agreement_of(judge, judge_pairs(split, limit, hh_path))
        finally:
            await judge.aclose()

    result = asyncio.run(measure())
    backend, name = getattr(observer, "backend", ""), getattr(observer, "model", "")
    model = "" if chosen.kind == "probe" else f"{backend}:{name}" if name else backend
    result.update(variant=chosen.name, description=chosen.description, kind=chosen.kind, model=model, split=split,
                  seconds=round(time.perf_counter() - started, 1))
    log.info("judge.agreement", extra={k: result.get(k) for k in ("variant", "split", "pairs", "agreement", "seconds")})
    return result
