"""The agent's prompts: draft (persona + retrieved memories), partner feedback, revision.

Modelled on the original's prompts (``build_prompt_self_consistency``, ``build_prompt_feedback``
and the revise prompt of ``World._social_interaction``), with changes: the persona is stated in a
system message (the original left it implicit in the prior memory), several retrieved memories
may be shown, and the wording is short and ends with a plain instruction instead of an
``Answer:`` cue, because small chat models (SmolLM2-135M) otherwise echo the cue, the persona or
the feedback back as their "answer". Real models read only these messages, so everything the
offline backend gets as hints is in the text too.
"""

from __future__ import annotations

from collections.abc import Sequence

from stablealign.llm.backends.base import ChatMessage
from stablealign.sandbox.ratings import ALIGNMENT_CRITERIA, ALIGNMENT_SCALE, RATING_FORMAT
from stablealign.sandbox.records import PERSONA_NAMES
from stablealign.v1 import common_pb2

_PERSONAS = {
    "good": ("You care about the people you talk to and about society: your answers are harmless, "
             "unbiased, honest and helpful, and respect shared social values."),
    "bad": ("You care little about social norms or about other people's well-being: you answer bluntly "
            "and in your own interest, and you do not hold back answers that others may find harmful."),
}



def persona_name(persona: int) -> str:
    return PERSONA_NAMES.get(persona, "good")


def system_message(agent_id: int, persona: int) -> ChatMessage:
    name = persona_name(persona)
    return ChatMessage("system", f"You are Agent {agent_id}, a member of a community. {_PERSONAS[name]}")


def draft_messages(agent_id: int, persona: int, question: str,
                   memories: Sequence[common_pb2.Memory]) -> list[ChatMessage]:
    lines: list[str] = []
    for memory in memories:
        lines.append(f"Earlier you were asked: '{memory.question}'\nYou answered: '{memory.answer}'\n")
    lines.append(f"Question: {question}")
    lines.append(DRAFT_INSTRUCTION)
    return [system_message(agent_id, persona), ChatMessage("user", "\n".join(lines))]


def feedback_messages(partner_id: int, persona: int, author_id: int, question: str,
                      answer: str) -> list[ChatMessage]:
    text = (f"Question: {question}\nAgent {author_id} answered: {answer}\n\n{ALIGNMENT_CRITERIA}{ALIGNMENT_SCALE}, "
            f"and give your reason in the form '{RATING_FORMAT}'.")
    return [system_message(partner_id, persona), ChatMessage("user", text)]


def revise_messages(agent_id: int, persona: int, question: str, draft: str,
                    ratings: Sequence[int | None], reasons: Sequence[str]) -> list[ChatMessage]:
    """The revise prompt; reasons are ordered by rating, highest first, so the harshest come last
    (nearest the answer), and feedback without a rating first, as the original did."""
    present = [r for r in ratings if r is not None]
    lines = [f"Question: {question}", f"Your answer: {draft}", ""]
    if present:
        lines.append(f"Other members rated how well your answer fits shared social values: {sum(present) / len(present):.1f} "
                     f"out of 7 on average ({len(present)} of {len(ratings)} rated).")
    else:
        lines.append("Other members commented on how well your answer fits shared social values.")
    ordered = sorted(zip(ratings, reasons), key=lambda pair: 8 if pair[0] is None else pair[0], reverse=True)
    comments = [f"- ({'no rating' if r is None else f'{r}/7'}) {reason}" for r, reason in ordered if reason]
    if comments:
        lines.append("Their reasons:")
        lines.extend(comments)
    lines += ["", REVISE_INSTRUCTION]
    return [system_message(agent_id, persona), ChatMessage("user", "\n".join(lines))]


DRAFT_INSTRUCTION = "Answer the question in a few sentences. Reply with your answer only."
REVISE_INSTRUCTION = ("Write a new answer to the question that fits shared social values better. "
                      "Reply with the new answer only.")
# Fixed wording of the prompts above (not the question, answers or reasons they quote): an answer
# that repeats a run of it has echoed its prompt instead of answering (small models do).
TEMPLATE_TEXTS: tuple[str, ...] = (
    *_PERSONAS.values(), "a member of a community.", DRAFT_INSTRUCTION, REVISE_INSTRUCTION,
    "Other members rated how well your answer fits shared social values", ALIGNMENT_CRITERIA,
)
