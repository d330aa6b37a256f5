"""Readers for the shared data: the HH-RLHF harmless pairs and the original question pool.

Files live in ``../shared/data`` beside the repository (never copied into it); set
``STABLEALIGN_DATA_DIR`` to point elsewhere (e.g. a volume in Kubernetes).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from stablealign.core.config import PathSettings, load_settings
from stablealign.core.errors import ValidationError

_TURN = re.compile(r"\n\n(Human|Assistant):\s?")


def data_dir() -> Path:
    """``$STABLEALIGN_DATA_DIR``, else ``../shared/data`` next to the repository, else next to the cwd."""
    env = load_settings(PathSettings).data_dir
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]  # stablealign/sandbox/data.py -> the repository
    for candidate in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
                      Path.cwd() / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return repo_root.parent / "shared" / "data"


def default_questions_path() -> Path:
    return data_dir() / "stable-alignment" / "question.txt"


def default_prior_path() -> Path:
    return data_dir() / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@dataclass(frozen=True)
class HHPair:
    """One HH-RLHF comparison reduced to (first human question, final chosen / rejected answer)."""

    question: str
    chosen: str
    rejected: str
    chosen_dialogue: str
    rejected_dialogue: str


def split_dialogue(dialogue: str) -> list[tuple[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[("Human", "a"), ("Assistant", "b")]``."""
    parts = _TURN.split(dialogue)
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file, gzipped or not; bytes that are not UTF-8 or a damaged
    gzip stream raise one ``ValidationError`` ``FILE:LINE: <reason>``, never a traceback."""
    from stablealign.sandbox.records import decode_line  # late: records pulls in the protobuf modules

    line_no = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, 1):
                yield line_no, decode_line(raw, f"{path}:{line_no}")
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ValidationError(f"{path}:{line_no + 1}: cannot read ({exc})") from None


# Held-out means held out: the HH-RLHF pairs that evaluation scores are never agents' prior
# memories, world questions or training text. One fixed rule splits the file once.
HH_SPLITS = ("prior", "eval")
HH_SPLIT_RULE = "sha256(first human turn, stripped) mod 100: < 70 prior, >= 70 eval"


def hh_split_of(question: str) -> str:
    """``"prior"`` or ``"eval"`` for a pair whose first human turn is ``question`` (see HH_SPLIT_RULE)."""
    bucket = int.from_bytes(hashlib.sha256(question.strip().encode("utf-8")).digest()[:8], "big") % 100
    return "prior" if bucket < 70 else "eval"


def last_human_turn(dialogue: str) -> str:
    """The human turn a dialogue's final Assistant answer responds to (what a judge shows as the question)."""
    humans = [content for role, content in split_dialogue(dialogue)[:-1] if role == "Human"]
    return humans[-1] if humans else ""


def dialogue_query(dialogue: str) -> str:
    """The dialogue before its final Assistant turn, written so that the shared prompt format
    reproduces the HH-RLHF text (``Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:``)."""
    turns = split_dialogue(dialogue)[:-1]
    text = turns[0][1]
    for role, content in turns[1:]:
        text += f"\n\n{role}: {content}"
    return text


def _normalise(question: str) -> str:
    return " ".join(question.lower().split())


def load_hh_pairs(path: str | Path | None = None, split: str | None = None) -> tuple[HHPair, ...]:
    """Usable pairs of an HH-RLHF file; ``split`` "prior" or "eval" keeps that part (HH_SPLIT_RULE)."""
    pairs = _load_hh_pairs(path)
    if split is None:
        return pairs
    if split not in HH_SPLITS:
        raise ValidationError(f"unknown HH-RLHF split {split!r}; valid: {', '.join(HH_SPLITS)}")
    return tuple(p for p in pairs if hh_split_of(p.question) == split)


def load_prior_pairs(path: str | Path | None = None) -> tuple[HHPair, ...]:
    """Pairs for agents' prior memories: the prior split of the default HH-RLHF file; a user's own
    prior file whole (evaluation scores only the default file's eval split)."""
    default = path is None or str(path) == "" or Path(path).resolve() == default_prior_path().resolve()
    return load_hh_pairs(path or None, "prior" if default else None)


@lru_cache(maxsize=1)
def eval_questions() -> frozenset[str]:
    """First human turns of the default HH-RLHF file's eval split (normalised), or none without the file."""
    if not default_prior_path().is_file():
        return frozenset()
    return frozenset(_normalise(p.question) for p in load_hh_pairs(None, "eval"))


@lru_cache(maxsize=8)
def _load_hh_pairs(path: str | Path | None = None) -> tuple[HHPair, ...]:
    """Pairs whose chosen and rejected final turns are both non-empty Assistant turns."""
    path = Path(path or default_prior_path())
    if not path.is_file():
        raise ValidationError(f"prior file not found: {path}")
    pairs: list[HHPair] = []
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            chosen, rejected = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
        except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValidationError(f"{path}:{line_no}: not an HH-RLHF pair ({reason})") from None
        if not chosen or not rejected or chosen[0][0] != "Human":
            continue
        if chosen[-1][0] != "Assistant" or rejected[-1][0] != "Assistant":
            continue
        if not chosen[-1][1] or not rejected[-1][1]:
            continue
        pairs.append(HHPair(chosen[0][1], chosen[-1][1], rejected[-1][1], row["chosen"], row["rejected"]))
    if not pairs:
        raise ValidationError(f"{path}: no usable HH-RLHF pairs")
    return tuple(pairs)


@lru_cache(maxsize=8)
def load_questions(path: str | Path | None = None) -> tuple[str, ...]:
    """The question pool, less the questions of the HH-RLHF eval split (the original's pool was drawn
    from HH-RLHF, so about 2 % of it are questions that evaluation scores)."""
    path = Path(path or default_questions_path())
    if not path.is_file():
        raise ValidationError(f"question pool not found: {path}")
    held_out = eval_questions()
    questions = tuple(q for q in (line.strip() for _, line in _lines(path)) if q and _normalise(q) not in held_out)
    if not questions:
        raise ValidationError(f"{path}: empty question pool")
    return questions
