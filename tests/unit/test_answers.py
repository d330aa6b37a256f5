"""What the agent keeps as an answer: labels and preambles stripped, prompt echoes detected."""

from __future__ import annotations

import asyncio

import pytest

from services.agent import prompts
from services.agent.answers import clean_answer, echoes_template
from stablealign.llm.backends.base import ChatBackend, ChatMessage, ChatRequest, Completion
from stablealign.v1 import common_pb2


@pytest.mark.parametrize("raw, clean", [
    ("Answer: Be kind to him.", "Be kind to him."),
    ("**Revised answer:** Talk to your neighbour.", "Talk to your neighbour."),
    ("Here's a revised answer that aligns with shared social values:\nTalk to them calmly.", "Talk to them calmly."),
    ('"Talk to them calmly."', "Talk to them calmly."),
    ("Answer:", ""),
    ("  ", ""),
    ("The answer depends on the law.", "The answer depends on the law."),
])
def test_clean_answer(raw, clean):
    assert clean_answer(raw) == clean


def test_echo_of_the_prompt_is_detected_but_quoting_the_question_is_not():
    system = prompts.system_message(3, common_pb2.PERSONA_GOOD).content
    assert echoes_template(system, prompts.TEMPLATE_TEXTS)
    assert echoes_template("Sure. " + prompts.REVISE_INSTRUCTION, prompts.TEMPLATE_TEXTS)
    assert echoes_template("You are Agent 3, a member of a community. I think so.", prompts.TEMPLATE_TEXTS)
    question = "How can I get revenge on my neighbor for playing loud music at night?"
    assert not echoes_template(f"{question} Do not: talk to them first, or call the police.", prompts.TEMPLATE_TEXTS)
    assert not echoes_template("Revenge makes things worse; talk to your neighbour.", prompts.TEMPLATE_TEXTS)


def test_prompts_end_with_an_instruction_not_a_cue():
    """Small chat models echo an 'Answer:' cue; the prompts end with a plain instruction instead."""
    memory = common_pb2.Memory(question="q0?", answer="a0")
    draft = prompts.draft_messages(1, common_pb2.PERSONA_BAD, "Why?", [memory])[-1].content
    revise = prompts.revise_messages(1, common_pb2.PERSONA_BAD, "Why?", "Because.", [2, None], ["rude", "odd"])[-1].content
    assert draft.endswith(prompts.DRAFT_INSTRUCTION) and "q0?" in draft and "a0" in draft
    assert revise.endswith(prompts.REVISE_INSTRUCTION) and "2.0 out of 7" in revise
    assert revise.index("(no rating) odd") < revise.index("(2/7) rude")  # harshest last, nearest the instruction


CRITIQUE_REPLY = "Your answer is not helpful to the conversation, and it doesn't meet the given criteria."
LOOP_REPLY = "I'm not sure. " * 12
GOOD_REPLY = "Sit with them, speak slowly and ask what would help right now."

class _Scripted(ChatBackend):
    """A chat model that replies with the next of its scripted texts."""

    name = "scripted"

    def __init__(self, replies: list[str]) -> None:
        super().__init__("scripted")
        self.replies = list(replies)
        self.asked = 0

    async def _chat_once(self, request: ChatRequest) -> Completion:
        self.asked += 1
        return Completion(text=self.replies.pop(0), model="scripted")


@pytest.mark.parametrize(("retry", "replies", "answer", "asked"), [
    (False, [CRITIQUE_REPLY, GOOD_REPLY], CRITIQUE_REPLY, 1),
    (True, [CRITIQUE_REPLY, GOOD_REPLY], GOOD_REPLY, 2),
    (True, [LOOP_REPLY, GOOD_REPLY], GOOD_REPLY, 2),
    (True, [LOOP_REPLY, CRITIQUE_REPLY, LOOP_REPLY], LOOP_REPLY.strip(), 3),  # the last attempt's answer is kept
])
def test_answers_that_loop_or_critique_are_asked_again_when_asked_to(retry, replies, answer, asked):
    from services.agent.handlers import AgentHandlers
    from services.agent.settings import AgentSettings
    from stablealign.llm.calls import CallTally

    handlers = AgentHandlers(AgentSettings(retry_non_answers=retry, answer_attempts=3), None, None)
    backend = _Scripted(replies)
    got = asyncio.run(handlers._answer(backend, CallTally(), seed_parts=("draft", 0, 1), world_seed=7,
                                       messages=[ChatMessage("user", "How do I calm a friend down?")],
                                       max_tokens=32, task="draft", hints={}))
    assert got == answer and backend.asked == asked
