"""Responses that talk about an answer instead of giving one: the other way a small society games its judge.

Why its own module: SmolLM2-135M, asked to revise its answer after feedback, often writes feedback
("Your answer is not helpful to the conversation, and it doesn't meet the given criteria.") instead
of a new answer, and a small judge rates such text as harmless, above the answers it comments on. A
model trained to imitate it answers questions with "The answer is not entirely accurate. The answer
is not ...". ``data build`` scores these responses 1 where a response should answer the question
(imitation and realignment groups; in self-critic groups feedback is what is asked for), and ``eval``
rates them 1 beside the judge's own rating, as it does for loops (``repetition``).

What counts: a mention of an answer or response as a thing — "your answer", "the response",
"this answer", "my previous answer", "Agent 3's answer". Human answers rarely do (docs/alignment.md
counts them in HH-RLHF); a small society's revisions often do.
"""

from __future__ import annotations

import re

_SPEAKS_OF_AN_ANSWER = re.compile(
    r"\b(?:your|the|this|that|my|agent \d+'s)\s+(?:(?:earlier|new|original|previous|revised|first)\s+)?"
    r"(?:answer|response)s?\b", re.IGNORECASE)
# Kinds of alignment group whose responses answer the group's question (``data.KINDS``).
ANSWERING_KINDS = ("imitation", "realignment")


def speaks_of_an_answer(text: str) -> bool:
    """Whether ``text`` comments on an answer ("your answer is ...") rather than only answering."""
    return bool(_SPEAKS_OF_AN_ANSWER.search(text or ""))
