"""An offline, deterministic chat backend: the whole SANDBOX runs with no key, no GPU, no network.

It does not generate language. It answers from the structured context the agent and observer
services put in ``ChatRequest.task`` / ``hints`` (see ``stablealign.llm.backends.base``):

- **draft** — an agent repeats its own earlier answer when it has met the question before
  (a retrieved memory with similarity >= ``SAME_QUESTION``); otherwise it answers from the
  HH-RLHF prior pool for the nearest prior question (word-overlap search): a good agent the
  *chosen* answer that scores best on ``heuristics.alignment_score``, a bad agent the *rejected*
  answer that scores worst. A bad agent with an aligned answer among its retrieved memories
  (score >= ``LEARNED_NORM``, in practice its own revised answers) imitates it and answers like a
  good agent. This is what makes a half-bad society drift toward alignment over rounds, through
  memory only — there is no round-based schedule — so how fast it drifts depends on how often
  retrieval returns revised answers (prior size, k, similarity threshold).
- **feedback** — ``Rating: <n> ### Reason: <text>`` from ``alignment_score``; a bad partner is
  lenient (+2, it overlooks harm).
- **revise** — a low mean rating (< ``REVISE_BELOW``), a rating <= 2, or a critical word in a
  reason ("harmful", "questionable"...) gives a clearly safer answer: an acknowledgement of the
  concern plus the best-aligned chosen answer for the nearest prior question; otherwise the draft
  is kept, lightly polished.
- **rate_alignment** / **rate_engagement** — the heuristics, in the same reply format.
- **chat** (anything else) — the best chosen answer for the nearest prior question, prefixed
  with ``[offline]`` so nobody mistakes it for a model's output.

Every choice is a pure function of the request: ties are broken with SHA-256 of the seed,
agent id, round and question (never Python's salted ``hash()``), so the same world seed gives
the same records in every process. The model name is ``offline-deterministic`` and the
constructor logs a warning, so the offline mode is obvious in records, metrics and logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import tempfile
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from stablealign.core.errors import ValidationError
from stablealign.core.logs import get_logger
from stablealign.llm.backends import heuristics
from stablealign.llm.backends.base import (
    TASK_DRAFT,
    TASK_FEEDBACK,
    TASK_RATE_ALIGNMENT,
    TASK_RATE_ENGAGEMENT,
    TASK_REVISE,
    ChatBackend,
    ChatRequest,
    Completion,
    RetryPolicy,
)
from stablealign.llm.backends.embeddings import cache_dir
from stablealign.llm.prompt_format import count_tokens
from stablealign.sandbox.data import default_prior_path, load_prior_pairs
from stablealign.sandbox.seeding import stable_hash

log = get_logger(__name__)

OFFLINE_MODEL = "offline-deterministic"
# A retrieved memory this similar is the same question met before: repeat that answer.
SAME_QUESTION = 0.95
# A retrieved memory scoring at least this (e.g. an agent's own revised answer) is an aligned example;
# a bad agent with one among its retrieved memories answers like a good one.
LEARNED_NORM = 6

# Mean partner rating below which a draft is rewritten into a safer answer.
REVISE_BELOW = 5.0
# Candidates drawn from the prior pool for one question.
NEAREST_K = 5
# Words of a partner's reason that call for a safer answer whatever the rating (heuristics' reasons use
# them only for scores <= 3; an LLM partner's reasons may use them anyway).
CRITICAL_REASON = re.compile(r"\b(harmful|unsafe|dangerous|illegal|unethical|offensive|inappropriate|violent|toxic|"
                             r"disrespectful|questionable)\b", re.IGNORECASE)
ACKNOWLEDGEMENTS = (
    ("Thank you for the feedback, you are right that my first answer could cause harm. I won't help with "
     "anything dangerous or illegal, but I understand the question and want to give a safer, respectful answer."),
    ("I hear the concern raised about my earlier answer and I'm sorry: it was not a responsible thing to say. "
     "Here is a safer way to think about it."),
    ("You're right to point out that my draft was inappropriate. I care about not hurting anyone, so instead "
     "I would say this."),
)


def rating_reply(score: int, reason: str) -> str:
    """The feedback/rating format the services parse: ``Rating: <n> ### Reason: <text>``."""
    return f"Rating: {score} ### Reason: {reason}"


@dataclass(frozen=True)
class PriorAnswer:
    """A prior pair; its answers' alignment scores are computed when first asked for.

    Why lazily: scoring all answers of the pool cost every process a noticeable CPU pause at its first
    offline request (in the first round of every world; docs/benchmarks.md), while a small world only compares the few
    entries nearest to its questions. With the cache on, the scores of the whole pool are read from
    it instead (``fill_prior_scores``).
    """

    question: str
    chosen: str
    rejected: str

    @cached_property
    def chosen_alignment(self) -> int:
        return heuristics.alignment_score(self.chosen)[0]

    @cached_property
    def rejected_alignment(self) -> int:
        return heuristics.alignment_score(self.rejected)[0]


class PriorIndex:
    """Nearest prior question by idf-weighted content-word cosine; an inverted index keeps it fast."""

    def __init__(self, pairs: Sequence[Any]) -> None:
        self.entries = [PriorAnswer(p.question, p.chosen, p.rejected) for p in pairs]
        fill_prior_scores(self.entries)
        postings: dict[str, list[int]] = defaultdict(list)
        words_per_entry = []
        for index, entry in enumerate(self.entries):
            words = sorted(set(heuristics.content_words(entry.question)))
            words_per_entry.append(words)
            for word in words:
                postings[word].append(index)
        n = len(self.entries)
        self.idf = {w: math.log((n + 1) / (len(ids) + 1)) + 1.0 for w, ids in postings.items()}
        self.postings = dict(postings)
        self.norms = [math.sqrt(math.fsum(self.idf[w] ** 2 for w in words)) or 1.0 for words in words_per_entry]
        self._nearest = lru_cache(maxsize=16384)(self._nearest_uncached)

    def nearest(self, question: str, k: int = NEAREST_K) -> tuple[int, ...]:
        """Indices of the ``k`` prior questions closest to ``question`` (deterministic order)."""
        return self._nearest(question, k)

    def _nearest_uncached(self, question: str, k: int) -> tuple[int, ...]:
        # Words in sorted order, never a set's: a set of strings iterates in an order that depends on the
        # process's hash seed, and float sums in another order round differently — enough to swap two
        # entries of equal score at the k-th place, so that processes (a run's workers, replicas) drafted
        # different answers for the same request.
        words = sorted(set(heuristics.content_words(question)))
        scores: dict[int, float] = defaultdict(float)
        for word in words:
            weight = self.idf.get(word)
            if weight is None:
                continue
            for index in self.postings[word]:
                scores[index] += weight * weight
        if not scores:  # nothing in common: a fixed pseudo-random set, the same for the same question
            start = stable_hash("nearest", question) % len(self.entries)
            return tuple((start + i * 7919) % len(self.entries) for i in range(k))
        ranked = sorted(scores.items(), key=lambda item: (-item[1] / self.norms[item[0]], item[0]))
        return tuple(index for index, _ in ranked[:k])


def _scores_path(entries: Sequence[PriorAnswer]) -> Path | None:
    """The cache file of these answers' scores under the current heuristics (None: the cache is off).

    Keyed by the texts themselves and the heuristics' source, so an edited prior file or lexicon
    never reads stale scores."""
    root = cache_dir()
    if root is None:
        return None
    digest = hashlib.sha256(Path(heuristics.__file__).read_bytes())
    for entry in entries:
        digest.update(entry.chosen.encode("utf-8", "surrogatepass") + b"\x1f")
        digest.update(entry.rejected.encode("utf-8", "surrogatepass") + b"\x1e")
    return root / "prior-scores" / f"{digest.hexdigest()}.json"


def _read_scores(path: Path, count: int) -> list[tuple[int, str]] | None:
    """The cached ``alignment_score`` results of ``count`` texts, or None (missing, torn or damaged)."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(results, list) and len(results) == count):
        return None
    checked = []
    for item in results:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and 1 <= item[0] <= 7
                and isinstance(item[1], str)):
            return None
        checked.append((item[0], item[1]))
    return checked


def fill_prior_scores(entries: Sequence[PriorAnswer]) -> None:
    """Sets every entry's alignment scores, and the heuristics' results for its texts, from the on-disk
    cache; on a miss computes them all (once per machine: reading is far cheaper than scoring) and stores
    them. A cache that is off, unwritable or damaged (wrong size, a score outside 1..7) leaves the scores
    to be computed when first asked for: never an error."""
    try:
        path = _scores_path(entries)
    except OSError:
        return
    if path is None:
        return
    texts = [text for entry in entries for text in (entry.chosen, entry.rejected)]
    results = _read_scores(path, len(texts))
    if results is None:
        results = [heuristics.alignment_score(text) for text in texts]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=".tmp-",
                                             delete=False) as out:
                json.dump(results, out, ensure_ascii=False)
            os.replace(out.name, path)  # whole or not at all, for processes reading it meanwhile
        except OSError as exc:
            log.debug("offline.prior_scores_not_cached", extra={"path": str(path), "error": str(exc)})
    heuristics.remember_alignment(dict(zip(texts, results, strict=True)))
    for entry, chosen, rejected in zip(entries, results[0::2], results[1::2], strict=True):
        entry.__dict__["chosen_alignment"] = chosen[0]  # what the cached_property would compute
        entry.__dict__["rejected_alignment"] = rejected[0]


_INDEX_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def _build_index(path: str) -> PriorIndex:
    return PriorIndex(load_prior_pairs(path))  # never the pairs evaluation scores


def prior_index(path: str | Path | None = None) -> PriorIndex:
    """The (cached) index of a prior file; built once per process and path."""
    with _INDEX_LOCK:
        return _build_index(str(Path(path or default_prior_path())))


def _require(hints: Mapping[str, Any], task: str, *keys: str) -> None:
    missing = [k for k in keys if k not in hints]
    if missing:
        raise ValidationError(f"offline backend: task {task!r} needs hints {missing}")


def polish(text: str) -> str:
    """The light touch applied to a draft that partners approved: tidy spacing and punctuation."""
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?\"')" else text + "."


class OfflineChatBackend(ChatBackend):
    """Deterministic answers from the HH-RLHF prior pool and transparent heuristics (module docstring)."""

    name = "offline"

    def __init__(self, model: str = OFFLINE_MODEL, prior_path: str | Path | None = None, seed: int = 0, *,
                 max_concurrency: int = 1024, retry: RetryPolicy | None = None) -> None:
        super().__init__(model or OFFLINE_MODEL, max_concurrency=max_concurrency,
                         retry=retry or RetryPolicy(attempts=1))
        self.prior_path = str(Path(prior_path or default_prior_path()))
        self.seed = seed
        self._index: PriorIndex | None = None
        log.warning("backend.offline", extra={
            "model": self.model, "prior_path": self.prior_path,
            "note": "OFFLINE deterministic backend: answers come from the HH-RLHF prior pool and lexicon "
                    "heuristics, not from a language model"})

    async def index(self) -> PriorIndex:
        if self._index is None:
            self._index = await asyncio.to_thread(prior_index, self.prior_path)
        return self._index

    async def _chat_once(self, request: ChatRequest) -> Completion:
        index = await self.index()
        text = self.respond(index, request)
        prompt_tokens = sum(count_tokens(m.content) for m in request.messages)
        return Completion(text=text, model=self.model, prompt_tokens=prompt_tokens,
                          completion_tokens=count_tokens(text))

    # --- the tasks -------------------------------------------------------------------------------------

    def respond(self, index: PriorIndex, request: ChatRequest) -> str:
        """The reply text for ``request``; a pure function of the request and the prior pool."""
        hints = request.hints or {}
        task = request.task
        if task == TASK_DRAFT:
            _require(hints, task, "persona", "question", "memories")
            return self.draft(index, hints)
        if task == TASK_FEEDBACK:
            _require(hints, task, "persona", "question", "answer")
            return self.feedback(hints)
        if task == TASK_REVISE:
            _require(hints, task, "persona", "question", "draft", "ratings", "reasons")
            return self.revise(index, hints)
        if task == TASK_RATE_ALIGNMENT:
            _require(hints, task, "answer")
            return rating_reply(*heuristics.alignment_score(str(hints["answer"])))
        if task == TASK_RATE_ENGAGEMENT:
            _require(hints, task, "question", "answer")
            return rating_reply(*heuristics.engagement_score(str(hints["question"]), str(hints["answer"])))
        return self.chat_reply(index, request)

    def _salt(self, hints: Mapping[str, Any]) -> tuple[Any, ...]:
        return (self.seed, hints.get("seed", 0), hints.get("agent_id", 0), hints.get("round", 0))

    def _pick(self, index: PriorIndex, question: str, *, aligned: bool, salt: tuple[Any, ...]) -> str:
        """Among the nearest prior answers, the best-aligned chosen one or the worst rejected one."""
        candidates = index.nearest(question)

        def key(i: int) -> tuple[int, int]:
            entry = index.entries[i]
            score = entry.chosen_alignment if aligned else -entry.rejected_alignment
            return (-score, stable_hash(*salt, question, i))

        best = index.entries[min(candidates, key=key)]
        return best.chosen if aligned else best.rejected

    def draft(self, index: PriorIndex, hints: Mapping[str, Any]) -> str:
        question = str(hints["question"])
        persona = str(hints["persona"]).lower()
        memories = sorted((m for m in hints.get("memories") or () if m.get("answer")),
                          key=lambda m: -float(m.get("similarity", 0.0)))
        if memories and float(memories[0].get("similarity", 0.0)) >= SAME_QUESTION:
            return str(memories[0]["answer"])
        aligned = persona != "bad"
        if not aligned:
            aligned = any(heuristics.alignment_score(str(m["answer"]))[0] >= LEARNED_NORM
                          for m in memories)
        return self._pick(index, question, aligned=aligned, salt=self._salt(hints))

    def feedback(self, hints: Mapping[str, Any]) -> str:
        score, reason = heuristics.alignment_score(str(hints["answer"]))
        if str(hints["persona"]).lower() == "bad":
            lenient = min(7, score + 2)
            if lenient != score:
                reason = reason.replace(f"is {heuristics.alignment_verdict(score)} (",
                                        f"is {heuristics.alignment_verdict(lenient)} (", 1)
                reason = f"{reason} A lenient partner: +2, risks overlooked."
            score = lenient
        return rating_reply(score, reason)

    def revise(self, index: PriorIndex, hints: Mapping[str, Any]) -> str:
        question = str(hints["question"])
        draft = str(hints["draft"])
        ratings = [int(r) for r in hints.get("ratings") or () if r is not None]
        reasons = [str(r) for r in hints.get("reasons") or ()]
        mean = sum(ratings) / len(ratings) if ratings else None
        critical = any(r <= 2 for r in ratings) or any(CRITICAL_REASON.search(r) for r in reasons)
        if (mean is not None and mean < REVISE_BELOW) or critical:
            salt = self._salt(hints)
            ack = ACKNOWLEDGEMENTS[stable_hash(*salt, question, "ack") % len(ACKNOWLEDGEMENTS)]
            return f"{ack} {polish(self._pick(index, question, aligned=True, salt=salt))}"
        return polish(draft)

    def chat_reply(self, index: PriorIndex, request: ChatRequest) -> str:
        user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        seed = request.seed if request.seed is not None else self.seed
        return "[offline] " + polish(self._pick(index, user, aligned=True, salt=(seed, "chat")))
