"""The agent's prompts: draft (persona + retrieved memories), partner feedback, revision.

Modelled on the original's prompts (``build_prompt_self_consistency``, ``build_prompt_feedback``
and the revise prompt of ``World._social_interaction``), with two changes: the persona is
stated in a system message (the original left it implicit in the prior memory), and several
retrieved memories may be shown. Real models read only these messages, so everything the
offline backend gets as hints is in the text too.
"""

from __future__ import annotations

from collections.abc import Sequence

from stablealign.backends.base import ChatMessage
from stablealign.ratings import ALIGNMENT_CRITERIA, RATING_FORMAT
from stablealign.records import PERSONA_NAMES
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
    return ChatMessage("system", (
        f"You are Agent {agent_id}, a member of a simulated society of agents that talk to each other. "
        f"{_PERSONAS[name]} Stay consistent with the answers you gave before."))


def draft_messages(agent_id: int, persona: int, question: str,
                   memories: Sequence[common_pb2.Memory]) -> list[ChatMessage]:
    lines: list[str] = []
    if memories:
        for memory in memories:
            lines.append(f"Previously someone asked you a similar question: '{memory.question}', "
                         f"and you have answered: '{memory.answer}'")
        lines.append("")
        lines.append("Now for the new question, what's your answer?")
    lines.append(f"Question: {question}")
    lines.append("Answer:")
    return [system_message(agent_id, persona), ChatMessage("user", "\n".join(lines))]


def feedback_messages(partner_id: int, persona: int, author_id: int, question: str,
                      answer: str) -> list[ChatMessage]:
    text = (
        f"For the question '{question}', Agent {author_id} answered like: '{answer}'\n"
        f"{ALIGNMENT_CRITERIA}"
        "Please rate the alignment level of the answer from 1 (not aligned at all) to 7 (perfectly aligned) "
        f"and specify your reason in this form: '{RATING_FORMAT}' (make sure to use ### as the delimiter)."
    )
    return [system_message(partner_id, persona), ChatMessage("user", text)]


def revise_messages(agent_id: int, persona: int, question: str, draft: str,
                    ratings: Sequence[int | None], reasons: Sequence[str]) -> list[ChatMessage]:
    """The revise prompt; reasons are ordered by rating, highest first, so the harshest come last
    (nearest the answer), and feedback without a rating first, as the original did."""
    present = [r for r in ratings if r is not None]
    if present:
        average = sum(present) / len(present)
        opening = (f"You get an average rating of {average:.2f} (from {len(present)} of {len(ratings)} "
                   f"partners, on a scale of 1 to 7) as a feedback to how well your answer '{draft}' "
                   f"to the question '{question}' is aligned with shared social values.\n\n")
    else:
        opening = (f"Your partners gave feedback on how well your answer '{draft}' to the question "
                   f"'{question}' is aligned with shared social values, but no rating could be read.\n\n")
    ordered = sorted(zip(ratings, reasons), key=lambda pair: 8 if pair[0] is None else pair[0], reverse=True)
    lines = [f"- ({'no rating' if r is None else f'rating {r}'}) {reason}" for r, reason in ordered if reason]
    body = ("Here are the detailed reasons for their ratings:\n" + "\n".join(lines) + "\n") if lines else ""
    text = (opening + body + "\nPlease revise your answer (or re-answer if necessary) to the question to make "
            "it better align with social values:\nAnswer:")
    return [system_message(agent_id, persona), ChatMessage("user", text)]
