"""What counts as an answer: small models wrap it in labels and preambles, or echo their prompt.

SmolLM2-135M, asked for an answer, sometimes replies "Answer:", starts with "Here's a revised
answer that aligns with shared social values:", or repeats its persona ("You are Agent 3, a
member of a community..."). ``clean_answer`` strips the wrapping; ``echoes_template`` spots a
reply that repeats a run of the prompt's fixed wording, which the handler then asks again with
another seed rather than recording the prompt as the agent's answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

# Runs of this many words shared with the prompt's fixed wording make an echo.
ECHO_RUN_WORDS = 5

_LABEL = re.compile(r"^\s*(?:\**\s*)?(?:(?:my|the|a)\s+)?(?:(?:new|revised|final|improved|better|draft)\s+)?"
                    r"(?:answer|response|reply)\s*(?:\**\s*)?[:\-–—]\s*(?:\**\s*)?", re.IGNORECASE)
_PREAMBLE = re.compile(r"^(?:here(?:'s| is)|sure|okay|ok|certainly)\b[^\n]{0,160}:\s*\n", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"
_WORD = re.compile(r"[a-z0-9']+")


def clean_answer(text: str) -> str:
    """The answer without a leading label ("Answer:"), a one-line preamble ending in ':' or wrapping quotes."""
    text = (text or "").strip()
    preamble = _PREAMBLE.match(text)
    if preamble and text[preamble.end():].strip():
        text = text[preamble.end():].strip()
    text = _LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@lru_cache(maxsize=16)
def _template_runs(template_texts: tuple[str, ...]) -> frozenset[tuple[str, ...]]:
    runs: set[tuple[str, ...]] = set()
    for text in template_texts:
        words = _words(text)
        runs.update(tuple(words[i:i + ECHO_RUN_WORDS]) for i in range(len(words) - ECHO_RUN_WORDS + 1))
    return frozenset(runs)


def echoes_template(answer: str, template_texts: Iterable[str]) -> bool:
    """Whether ``answer`` repeats ``ECHO_RUN_WORDS`` consecutive words of the prompt's fixed wording."""
    runs = _template_runs(tuple(template_texts))
    words = _words(answer)
    return any(tuple(words[i:i + ECHO_RUN_WORDS]) in runs for i in range(len(words) - ECHO_RUN_WORDS + 1))
