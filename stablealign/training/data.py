"""Alignment data: mine training groups from SANDBOX records, mix, dedupe, split, load and validate.

A training example is a *group* ``{"query": str, "responses": [str], "scores": [number]}`` (the
original's format) plus provenance keys (``kind``, ``world_id``, ``round``, ``agent_id``, ``models``,
``question``). Three kinds are mined from one interaction record (DESIGN §1):

- ``imitation`` (Alignment Imitation): query = the question; responses = draft and revision;
  scores = the observer's alignment ratings before and after.

Which number is a score (``scores=``): ``expected`` (the default) takes the observer's and partners'
*expected* rating (the mean of their digit distribution, ``gen_moral_expected_*``,
``rating_expected``) where the record has one, else the 1..7 rating; ``rating`` takes the 1..7 rating
alone (the original's choice). Why expected first: a small judge's argmax is nearly always the same
digit, so argmax scores make almost every group a tie and the ranking term of the loss has nothing
to rank, while the expectation keeps the judge's (measured) preference. ``data build`` reports the
share of tied groups.
- ``self_critic`` (Self-Critic): query = question + the draft being judged
  (``template.format_critic_query``); responses = the partners' feedback texts; scores = the ratings
  each partner gave.
- ``realignment`` (Realignment), only when after > before and after > 4: query = question + draft +
  feedback (``template.format_realignment_query``); responses = the revision AND the draft, scored
  after / before. Why the draft too: with the revision alone the group would be pure SFT and the
  ranking term of the loss would have nothing to rank; the draft, answered to the same prompt and
  rated lower by the observer, is the natural negative.

Responses that loop (``repetition.loops``: more than ``max_repeated`` of their word 3-grams repeat an
earlier one) are demoted before the mix (``demote_loops``): scored 1, the rating scale's floor, so that
the SFT term never imitates them and the ranking term of the loss pushes them below the group's other
responses. Why: the small judge can rate a loop highly, and a model fine-tuned on its own greedy loops
loops more. A loop whose group has no other response above 1 is dropped instead (it must not tie for
best), and so is a group left without a response that does not loop. ``--max-repeated 1`` keeps every
response as the judge rated it. ``data build`` reports how many were demoted and dropped.

Responses that speak of an answer instead of answering (``critiques.speaks_of_an_answer``: "Your answer
is not helpful ...") are demoted the same way where a response should answer the question (imitation
and realignment groups; ``demote_critiques``). Why: a small society's revisions are often feedback on
the draft, the small judge rates them above real answers, and a model trained on them answers every
question with "The answer is not ...", which then loops. ``--keep-critiques`` keeps them as rated.

Handling of imperfect input (documented, tested):
- a missing rating (``null``: the observer's answer could not be parsed) drops that response —
  never a made-up number; a group left with no response is not emitted; a group left with one
  response is kept (pure SFT: the loss is then its cross-entropy, D = 0);
- identical (query, responses) groups are kept once;
- the held-out split is by the record's question, so no question (and therefore no query built
  from it) appears in both splits;
- ``load_alignment_groups`` rejects missing keys, empty responses, non-numeric scores and length
  mismatches with a ``ValidationError`` naming ``file:line``; texts longer than ``max_chars``
  characters are truncated with one counted warning (the collator also truncates to
  ``max_length`` tokens and counts it).

Bad input — the policy is **strict**, for groups files and records files alike: the first bad
line raises one ``ValidationError`` ``FILE:LINE: <reason>`` (the command line prints it as
``error: ...`` and exits 2; never a traceback), and nothing is skipped, because a silently dropped
line changes what is trained on. Bad lines are: bytes that are not UTF-8; invalid JSON (also
numbers too long, nesting too deep, lone surrogates); a value that is neither a record nor a
group; a group whose ``query`` / ``responses`` / ``scores`` have the wrong type, whose scores
are not finite numbers in [1, rating_scale] (7 unless the caller says otherwise), or whose
responses and scores differ in length; a record that fails ``stablealign.sandbox.records.validate_record``
(wrong types such as ``agent_id: "x"`` or ``rating: ["a"]``, ``iteration: null``, ratings outside
1..7). A missing rating (``null``) in a record stays valid and drops that response (above).

The original's released ``sandbox_v1.json`` / ``sandbox_v2.json`` are read as well. What we could
confirm (its ``alignment.py``: ``pd.read_json(path, orient="records")`` then ``query``/``responses``/
``scores`` per item, scores cast to int) is a JSON array of such groups; the files themselves are
not in the stored copy of the repository, so any other keys are carried through untouched and
the kind is recorded as ``original`` (already mixed 5:1:1 by its authors, so the mix is not
re-applied to them).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stablealign.core.errors import ValidationError
from stablealign.core.logs import get_logger
from stablealign.sandbox.ratings import RATING_SCALE, show_value
from stablealign.sandbox.records import (
    check_unicode,
    decode_line,
    feedback_texts,
    iter_json_lines,
    validate_record,
)
from stablealign.training.critiques import ANSWERING_KINDS, speaks_of_an_answer
from stablealign.training.repetition import DEFAULT_MAX_REPEATED, loops
from stablealign.training.template import format_critic_query, format_realignment_query

log = get_logger(__name__)

KINDS = ("imitation", "self_critic", "realignment")
SCORE_SOURCES = ("expected", "rating")
DEFAULT_SCORE_SOURCE = "expected"
ORIGINAL_KIND = "original"
DEFAULT_MIX = "5:1:1"
REQUIRED_KEYS = ("query", "responses", "scores")


@dataclass(frozen=True)
class AlignmentGroup:
    """One training example: a query, its responses and their scores, plus where it came from."""

    query: str
    responses: tuple[str, ...]
    scores: tuple[float, ...]
    kind: str = ORIGINAL_KIND
    question: str = ""  # the record's question: the unit of the held-out split
    world_id: str = ""
    round: int | None = None
    agent_id: int | None = None
    models: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        """Identity for deduplication."""
        return self.query, self.responses

    @property
    def split_key(self) -> str:
        return self.question or self.query

    def to_json(self) -> dict[str, Any]:
        row = dict(self.extra)
        row.update({
            "query": self.query, "responses": list(self.responses),
            "scores": [int(s) if float(s).is_integer() else s for s in self.scores],
            "kind": self.kind, "world_id": self.world_id, "round": self.round, "agent_id": self.agent_id,
            "models": dict(self.models), "question": self.question,
        })
        return row


# --- mining -----------------------------------------------------------------------------------


def _score(value: Any) -> float | None:
    """A rating, or None when it is missing or not a number (never a made-up value)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _provenance(row: Mapping[str, Any]) -> dict[str, Any]:
    models = {}
    for role in ("agent", "observer"):
        ref = row.get(f"{role}_model")
        if isinstance(ref, Mapping):  # older records: {"backend", "model"}
            ref, backend = ref.get("model", ""), ref.get("backend", "")
        else:
            backend = row.get(f"{role}_backend") or ""
        if ref or backend:
            models[role] = {"backend": str(backend), "model": str(ref or "")}
    rnd = row.get("round", row.get("iteration"))
    return {
        "question": str(row.get("question", "")).strip(),
        "world_id": str(row.get("world_id", "") or ""),
        "round": int(rnd) if rnd is not None else None,
        "agent_id": int(row["agent_id"]) if row.get("agent_id") is not None else None,
        "models": models,
    }


def _scored(pairs: Iterable[tuple[Any, Any]]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Keeps (text, score) pairs whose text is non-empty and whose score is a number."""
    kept = [(str(t).strip(), s) for t, s in ((t, _score(s)) for t, s in pairs)
            if t is not None and str(t).strip() and s is not None]
    return tuple(t for t, _ in kept), tuple(s for _, s in kept)


def _record_scores(row: Mapping[str, Any], source: str) -> tuple[float | None, float | None, list[Any]]:
    """(alignment before, after, partners' ratings) of a record as ``source`` reads them (module
    docstring): the expected rating where there is one and ``source`` is ``expected``, else the rating."""
    if source not in SCORE_SOURCES:
        raise ValidationError(f"scores {source!r}: expected one of {', '.join(SCORE_SOURCES)}")

    def pick(rating: Any, expected: Any) -> Any:
        return expected if source == "expected" and _score(expected) is not None else rating

    before = pick(row.get("gen_moral_score_before"), row.get("gen_moral_expected_before"))
    after = pick(row.get("gen_moral_score_after"), row.get("gen_moral_expected_after"))
    ratings, expected = list(row.get("rating") or []), list(row.get("rating_expected") or [])
    partners = [pick(r, expected[i] if i < len(expected) else None) for i, r in enumerate(ratings)]
    return _score(before), _score(after), partners


def mine_record(row: Mapping[str, Any], *, scores: str = DEFAULT_SCORE_SOURCE) -> list[AlignmentGroup]:
    """The imitation, self-critic and realignment groups of one interaction record (checked first
    by ``validate_record``: wrong types or ratings outside 1..7 raise ``ValidationError``); ``scores``
    says which number scores a response (module docstring)."""
    validate_record(row)
    prov = _provenance(row)
    question = prov["question"]
    draft, revised = str(row.get("draft_answer") or "").strip(), str(row.get("revised_answer") or "").strip()
    before, after, ratings = _record_scores(row, scores)
    groups: list[AlignmentGroup] = []
    if not question:
        return groups

    responses, scored = _scored([(draft, before), (revised, after)])
    if responses:
        groups.append(AlignmentGroup(question, responses, scored, "imitation", **prov))

    texts = critic_responses(row)
    if draft:
        responses, scored = _scored(zip(texts, ratings + [None] * (len(texts) - len(ratings))))
        if responses:
            groups.append(AlignmentGroup(format_critic_query(question, draft), responses, scored, "self_critic",
                                         **prov))

    if before is not None and after is not None and after > before and after > 4 and draft and revised:
        query = format_realignment_query(question, draft, [str(t) for t in texts if str(t or "").strip()])
        groups.append(AlignmentGroup(query, (revised, draft), (after, before), "realignment", **prov))
    return groups


HH_SFT_KIND = "hh_sft"


def hh_sft_groups(limit: int | None = None, hh_path: str | Path | None = None) -> list[AlignmentGroup]:
    """The human-data reference (the paper's ``hh-rlhf-sft``): one group per HH-RLHF pair of the prior
    split — never the eval split — whose one response is the chosen final answer to the dialogue
    before it (pure SFT: the loss of a one-response group is its cross-entropy)."""
    from stablealign.sandbox.data import dialogue_query, load_prior_pairs

    if limit is not None and limit < 1:
        raise ValidationError("limit must be >= 1")
    pairs = load_prior_pairs(hh_path)
    pairs = pairs[:limit] if limit else pairs
    return [AlignmentGroup(dialogue_query(p.chosen_dialogue), (p.chosen,), (float(RATING_SCALE),), HH_SFT_KIND,
                           question=p.question) for p in pairs]


def critic_responses(row: Mapping[str, Any]) -> list[str]:
    """Self-Critic responses: each partner's whole reply (rating and reason), else its reason."""
    raw, reasons = feedback_texts(dict(row))
    return [str(r) if str(r or "").strip() else str(reasons[i] if i < len(reasons) else "")
            for i, r in enumerate(raw)]


def mine_records(rows: Iterable[Mapping[str, Any]], *, source: str = "records",
                 scores: str = DEFAULT_SCORE_SOURCE) -> list[AlignmentGroup]:
    groups: list[AlignmentGroup] = []
    for index, row in enumerate(rows, 1):
        try:
            groups.extend(mine_record(row, scores=scores))
        except ValidationError as exc:
            raise ValidationError(f"{source}: record {index}: {exc}") from exc
    return groups


# --- mixing, dedupe, split ----------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, float]:
    """``"5:1:1"`` -> weights of imitation, self_critic, realignment."""
    parts = text.split(":")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValidationError(f"mix {text!r}: expected three numbers like 5:1:1") from None
    if len(weights) != 3 or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValidationError(f"mix {text!r}: expected three non-negative numbers like 5:1:1, not all 0")
    return dict(zip(KINDS, weights))


def demote(groups: Iterable[AlignmentGroup], bad: Callable[[AlignmentGroup, str], bool]
           ) -> tuple[list[AlignmentGroup], Counter]:
    """Groups with the responses ``bad`` flags scored 1 (module docstring), and the counts: responses
    demoted, responses dropped (no other response above 1, so scored 1 they would tie for best), groups
    dropped (nothing left that is not flagged)."""
    counts: Counter = Counter()
    out: list[AlignmentGroup] = []
    for group in groups:
        flagged = [bad(group, r) for r in group.responses]
        if not any(flagged):
            out.append(group)
            continue
        kept = [s for s, flag in zip(group.scores, flagged) if not flag]
        if not kept:
            counts["groups_dropped"] += 1
            continue
        floor = min(kept) <= 1
        pairs = [(r, 1.0) if flag else (r, s) for r, s, flag in zip(group.responses, group.scores, flagged)
                 if not (flag and floor)]
        counts["dropped" if floor else "demoted"] += sum(flagged)
        out.append(replace(group, responses=tuple(r for r, _ in pairs), scores=tuple(s for _, s in pairs)))
    return out, counts


def demote_loops(groups: Iterable[AlignmentGroup],
                 max_repeated: float = DEFAULT_MAX_REPEATED) -> tuple[list[AlignmentGroup], dict[str, Any]]:
    """Groups with their looping responses scored 1 (``demote``), and the counts."""
    if not 0 <= max_repeated <= 1 or not math.isfinite(max_repeated):
        raise ValidationError(f"max_repeated {max_repeated}: expected a share in [0, 1]")
    out, counts = demote(groups, lambda _group, response: loops(response, max_repeated))
    return out, {"max_repeated": max_repeated, "demoted": counts["demoted"], "loops_dropped": counts["dropped"],
                 "groups_dropped": counts["groups_dropped"]}


def demote_critiques(groups: Iterable[AlignmentGroup]) -> tuple[list[AlignmentGroup], dict[str, Any]]:
    """Groups with the responses that speak of an answer instead of answering (``critiques``) scored 1,
    where a response should answer the question (imitation and realignment), and the counts."""
    out, counts = demote(groups, lambda group, response: group.kind in ANSWERING_KINDS
                         and speaks_of_an_answer(response))
    return out, {"demoted": counts["demoted"], "dropped": counts["dropped"],
                 "groups_dropped": counts["groups_dropped"]}


def dedupe(groups: Iterable[AlignmentGroup]) -> list[AlignmentGroup]:
    seen: set = set()
    out = []
    for group in groups:
        if group.key not in seen:
            seen.add(group.key)
            out.append(group)
    return out


def mix(groups: Sequence[AlignmentGroup], weights: Mapping[str, float], rng: random.Random) -> list[AlignmentGroup]:
    """Subsamples the mined kinds to the ratio ``weights`` (seeded), keeping as much data as possible.

    The largest total that fits: scale = min over kinds with weight > 0 and data of (available /
    weight); each kind keeps round(scale * weight) groups, sampled without replacement. A kind with
    no data at all is left out of the ratio (a small world may have no realignment yet), with a
    warning. Groups of other kinds (``original``) pass through unchanged. Order is kept.
    """
    by_kind: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_kind.setdefault(group.kind, []).append(index)
    present = {k: w for k, w in weights.items() if w > 0 and by_kind.get(k)}
    for kind, weight in weights.items():
        if weight > 0 and not by_kind.get(kind):
            log.warning("data.mix_kind_missing", extra={"kind": kind})
    keep: set[int] = {i for k, idx in by_kind.items() if k not in KINDS for i in idx}
    if present:
        scale = min(len(by_kind[k]) / w for k, w in present.items())
        for kind, weight in present.items():
            count = min(len(by_kind[kind]), int(round(scale * weight)))
            keep.update(rng.sample(by_kind[kind], count))
    return [g for i, g in enumerate(groups) if i in keep]


def split_holdout(groups: Sequence[AlignmentGroup], fraction: float,
                  rng: random.Random) -> tuple[list[AlignmentGroup], list[AlignmentGroup]]:
    """(train, held-out), split by question so that no question is in both."""
    if not 0 <= fraction < 1:
        raise ValidationError(f"holdout {fraction}: expected a fraction in [0, 1)")
    keys = sorted({g.split_key for g in groups})
    rng.shuffle(keys)
    n_held = int(math.ceil(fraction * len(keys))) if fraction > 0 and len(keys) > 1 else 0
    held = set(keys[:n_held])
    return [g for g in groups if g.split_key not in held], [g for g in groups if g.split_key in held]


# --- reading --------------------------------------------------------------------------------------


def _iter_json_items(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, item) of a JSONL file or of a JSON array file (the original's sandbox_v*.json); a bad
    line raises ``ValidationError`` ``FILE:LINE: <reason>`` (bad UTF-8, bad JSON)."""
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"["):
        yield from iter_json_lines(path)
        return
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start, line = data.rfind(b"\n", 0, exc.start) + 1, data.count(b"\n", 0, exc.start) + 1
        decode_line(data[line_start:exc.end], f"{path}:{line}")
        raise  # not reached: decode_line raised for the same bytes
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip()) + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise ValidationError(f"{path}:{text.count(chr(10)) + 1}: unterminated JSON array")
        line = text.count("\n", 0, pos) + 1
        if text[pos] == "]":
            if text[pos + 1:].strip():
                raise ValidationError(f"{path}:{line}: invalid JSON (extra data after the array)")
            return
        start = pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise ValidationError(f"{path}:{line}: invalid JSON (nested too deeply)") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise ValidationError(f"{path}:{line}: invalid JSON ({str(exc).splitlines()[0]})") from None
        check_unicode(item, text[start:pos], f"{path}:{line}")
        yield line, item


def _is_group(item: Any) -> bool:
    return isinstance(item, dict) and "responses" in item and "draft_answer" not in item


def _validated_group(item: Any, where: str, max_chars: int | None, truncated: Counter,
                     rating_scale: float = RATING_SCALE) -> AlignmentGroup:
    if not isinstance(item, dict):
        raise ValidationError(f"{where}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in item]
    if missing:
        raise ValidationError(f"{where}: missing key(s) {', '.join(missing)}")
    query, responses, scores = item["query"], item["responses"], item["scores"]
    if not isinstance(query, str) or not query.strip():
        raise ValidationError(f"{where}: 'query' must be a non-empty string")
    if not isinstance(responses, list) or not responses:
        raise ValidationError(f"{where}: 'responses' must be a non-empty list")
    if any(not isinstance(r, str) or not r.strip() for r in responses):
        raise ValidationError(f"{where}: every response must be a non-empty string")
    if not isinstance(scores, list):
        raise ValidationError(f"{where}: 'scores' must be a list")
    if len(scores) != len(responses):
        raise ValidationError(f"{where}: {len(responses)} responses but {len(scores)} scores")
    for score in scores:
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ValidationError(f"{where}: score {score!r} is not a number")
        if isinstance(score, float) and not math.isfinite(score):
            raise ValidationError(f"{where}: score {show_value(score)} is not a finite number")
        if not 1 <= score <= rating_scale:
            raise ValidationError(f"{where}: score {show_value(score)} is outside the rating scale 1..{rating_scale:g}")

    def cut(text: str) -> str:
        if max_chars is not None and len(text) > max_chars:
            truncated["texts"] += 1
            return text[:max_chars]
        return text

    known = {"query", "responses", "scores", "kind", "question", "world_id", "round", "agent_id", "models"}
    models = item.get("models") if isinstance(item.get("models"), dict) else {}
    return AlignmentGroup(
        query=cut(query), responses=tuple(cut(r) for r in responses), scores=tuple(float(s) for s in scores),
        kind=str(item.get("kind") or ORIGINAL_KIND), question=str(item.get("question") or ""),
        world_id=str(item.get("world_id") or ""),
        round=item.get("round") if _is_int(item.get("round")) else None,
        agent_id=item.get("agent_id") if _is_int(item.get("agent_id")) else None,
        models=models, extra={k: v for k, v in item.items() if k not in known},
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_alignment_groups(path: str | Path, *, max_chars: int | None = None,
                          rating_scale: float = RATING_SCALE) -> list[AlignmentGroup]:
    """Reads and validates a groups file (our JSONL or the original's JSON array); strict: the first
    bad line raises ``ValidationError`` ``FILE:LINE: <reason>`` (module docstring).

    A one-response group is allowed (pure SFT). Scores must lie in [1, rating_scale]. Texts longer
    than ``max_chars`` characters are truncated, and the number of truncated texts is logged once
    as a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"data file not found: {path}")
    truncated: Counter = Counter()
    groups = [_validated_group(item, f"{path}:{line}", max_chars, truncated, rating_scale)
              for line, item in _iter_json_items(path)]
    if not groups:
        raise ValidationError(f"{path}: no alignment groups")
    if truncated["texts"]:
        log.warning("data.truncated", extra={"path": str(path), "texts": truncated["texts"], "max_chars": max_chars})
    return groups


def read_inputs(path: str | Path) -> tuple[list[dict[str, Any]], list[AlignmentGroup]]:
    """A records file and/or ready groups: (records, groups). Records are recognised by ``draft_answer``
    and checked by ``validate_record``; strict: the first bad line raises ``ValidationError``
    ``FILE:LINE: <reason>`` (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"file not found: {path}")
    records: list[dict[str, Any]] = []
    groups: list[AlignmentGroup] = []
    truncated: Counter = Counter()
    for line, item in _iter_json_items(path):
        if _is_group(item):
            groups.append(_validated_group(item, f"{path}:{line}", None, truncated))
        elif not isinstance(item, dict) or "draft_answer" in item:
            try:
                records.append(validate_record(item))  # a non-object: "expected a JSON object, got ..."
            except ValidationError as exc:
                raise ValidationError(f"{path}:{line}: {exc}") from None
        else:
            raise ValidationError(f"{path}:{line}: neither an interaction record (draft_answer, ...) "
                                  f"nor an alignment group (query, responses, scores)")
    return records, groups


# --- the whole build --------------------------------------------------------------------------


@dataclass
class BuildResult:
    train: list[AlignmentGroup]
    heldout: list[AlignmentGroup]
    stats: dict[str, Any]


def _histogram(groups: Iterable[AlignmentGroup]) -> dict[str, int]:
    """Responses per score, expected ratings rounded to the nearest whole rating (half up)."""
    counts: Counter = Counter()
    for group in groups:
        for score in group.scores:
            counts[str(math.floor(score + 0.5))] += 1
    return dict(sorted(counts.items(), key=lambda kv: float(kv[0])))


def _ties(groups: Sequence[AlignmentGroup]) -> dict[str, Any]:
    """How many groups the ranking term can rank: groups of two or more responses, and those whose
    best score is shared by every response (ties: the penalty is then the SFT loss's mirror, no ranking)."""
    ranked = [g for g in groups if len(g.responses) >= 2]
    tied = sum(max(g.scores) == min(g.scores) for g in ranked)
    return {"groups": len(groups), "single_response": len(groups) - len(ranked), "multi_response": len(ranked),
            "tied": tied, "tied_share": (tied / len(ranked)) if ranked else None}


def build_alignment_data(records: Sequence[Mapping[str, Any]], groups: Sequence[AlignmentGroup] = (), *,
                         mix_ratio: str = DEFAULT_MIX, holdout: float = 0.1, seed: int = 0,
                         scores: str = DEFAULT_SCORE_SOURCE,
                         max_repeated: float = DEFAULT_MAX_REPEATED, critiques: bool = True) -> BuildResult:
    """mine -> demote loops (and critiques) -> dedupe -> mix (seeded) -> split by question (seeded); with
    counts for the report."""
    weights = parse_mix(mix_ratio)
    mined = mine_records(records, scores=scores) + list(groups)
    guarded, looping = demote_loops(mined, max_repeated)
    guarded, critiqued = demote_critiques(guarded) if critiques else (guarded, None)
    unique = dedupe(guarded)
    mixed = mix(unique, weights, random.Random(seed))
    train, heldout = split_holdout(mixed, holdout, random.Random(seed + 1))
    kinds = sorted({g.kind for g in mined}, key=lambda k: (KINDS + (k,)).index(k))
    stats: dict[str, Any] = {
        "records": len(records), "mix": mix_ratio, "holdout": holdout, "seed": seed, "scores": scores,
        "kinds": {k: {"mined": sum(g.kind == k for g in mined), "unique": sum(g.kind == k for g in unique),
                      "mixed": sum(g.kind == k for g in mixed), "train": sum(g.kind == k for g in train),
                      "heldout": sum(g.kind == k for g in heldout),
                      "responses": sum(len(g.responses) for g in mixed if g.kind == k),
                      "score_histogram": _histogram(g for g in mixed if g.kind == k)} for k in kinds},
        "total": {"mined": len(mined), "unique": len(unique), "mixed": len(mixed), "train": len(train),
                  "heldout": len(heldout)},
        "dropped_null_ratings": _count_null_ratings(records),
        "loops": looping,
        "critiques": critiqued,
        "ties": {"train": _ties(train), "heldout": _ties(heldout)},
    }
    return BuildResult(train, heldout, stats)


def _count_null_ratings(records: Iterable[Mapping[str, Any]]) -> int:
    count = 0
    for row in records:
        count += sum(_score(row.get(k)) is None for k in ("gen_moral_score_before", "gen_moral_score_after"))
        count += sum(_score(r) is None for r in (row.get("rating") or []))
    return count


def heldout_path(out: str | Path) -> Path:
    """``data/alignment.jsonl`` -> ``data/alignment.heldout.jsonl``."""
    out = Path(out)
    return out.with_name(out.stem + ".heldout" + (out.suffix or ".jsonl"))


def stats_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".stats.json")


def write_groups(groups: Iterable[AlignmentGroup], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for group in groups:
            handle.write(json.dumps(group.to_json(), ensure_ascii=False) + "\n")
            count += 1
    return count


def describe_loops(looping: Mapping[str, Any]) -> str:
    """One line of ``demote_loops``'s counts, for ``data build`` and the pipeline's summary."""
    return (f"looping responses (over {looping.get('max_repeated', DEFAULT_MAX_REPEATED):g} of their 3-grams "
            f"repeated): " + _demotions(looping.get("demoted"), looping.get("loops_dropped"), looping.get("groups_dropped")))


def describe_critiques(critiqued: Mapping[str, Any] | None) -> str:
    """One line of ``demote_critiques``'s counts (or that they were kept), for ``data build`` and the pipeline."""
    what = "responses that speak of an answer instead of answering: "
    if critiqued is None:
        return what + "kept as rated (--keep-critiques)"
    return what + _demotions(critiqued.get("demoted"), critiqued.get("dropped"), critiqued.get("groups_dropped"))


def _demotions(demoted: int | None, dropped: int | None, groups_dropped: int | None) -> str:
    """``demote``'s counts in words."""
    return f"{demoted or 0} scored 1, {dropped or 0} dropped; {groups_dropped or 0} groups with nothing else dropped"


def print_stats(stats: Mapping[str, Any]) -> None:
    """Counts per kind and score histograms as rich tables (stdout)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"alignment data from {stats['records']} records (mix {stats['mix']})")
    for column in ("kind", "mined", "unique", "mixed", "train", "held-out", "responses"):
        table.add_column(column, justify="right" if column != "kind" else "left")
    for kind, row in stats["kinds"].items():
        table.add_row(kind, *(str(row[k]) for k in ("mined", "unique", "mixed", "train", "heldout", "responses")))
    total = stats["total"]
    table.add_row("total", *(str(total[k]) for k in ("mined", "unique", "mixed", "train", "heldout")), "")
    console.print(table)
    scores = sorted({s for row in stats["kinds"].values() for s in row["score_histogram"]}, key=float)
    if scores:
        hist = Table(title="score histogram (responses in the mixed data, rounded to whole ratings)")
        hist.add_column("kind")
        for score in scores:
            hist.add_column(score, justify="right")
        for kind, row in stats["kinds"].items():
            hist.add_row(kind, *(str(row["score_histogram"].get(s, 0)) for s in scores))
        console.print(hist)
    ties = (stats.get("ties") or {}).get("train") or {}
    if ties.get("multi_response"):
        console.print(f"tied groups (every response scored the same; nothing to rank): {ties['tied']} of "
                      f"{ties['multi_response']} training groups with 2+ responses ({100 * ties['tied_share']:.0f} %), "
                      f"scores: {stats.get('scores', 'rating')}")
    looping = stats.get("loops") or {}
    if any(looping.get(k) for k in ("demoted", "loops_dropped", "groups_dropped")):
        console.print(describe_loops(looping))
    if "critiques" in stats:
        console.print(describe_critiques(stats["critiques"]))
    if stats.get("dropped_null_ratings"):
        console.print(f"missing ratings (null) dropped: {stats['dropped_null_ratings']}")
