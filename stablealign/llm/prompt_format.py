"""The one plain-text chat template for models that take a single prompt string.

TGI's generate API and a tokenizer without a chat template both need the conversation as one
string. The original used different prompt formats for simulation, training and inference, so a
trained model was asked questions in a format it had never seen. Here every path renders a
conversation the way the trainer formats its examples (``stablealign/training/template.py``, the
HH-RLHF dialogue format, which is also what the tiny model's ``chat_template`` produces):

    <system text>

    Human: <user text>

    Assistant: <assistant text>

    Human: <user text>

    Assistant:

so that ``render_prompt([user(q)]) == format_prompt(q)``. Generation stops at the
next ``Human:`` turn (a stop sequence), so a model that keeps role-playing does not leak a fake
turn into the answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from stablealign.llm.backends.base import ChatMessage

USER_PREFIX = "Human: "
ASSISTANT_PREFIX = "Assistant:"
# Where a completion ends: the start of a new human turn.
STOP_SEQUENCES: tuple[str, ...] = ("\nHuman:",)
# A training example: the prompt, then the response after one space (as in HH-RLHF dialogues), then EOS.
PROMPT_TEMPLATE = USER_PREFIX + "{query}\n\n" + ASSISTANT_PREFIX
RESPONSE_PREFIX = " "

# Jinja chat template equivalent to BOS + ``format_prompt`` for a conversation ending in a user turn
# (``apply_chat_template(..., tokenize=True)`` adds no special tokens itself, hence the BOS here).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}\n\n"
    "{%- elif message['role'] == 'user' -%}Human: {{ message['content'] }}\n\nAssistant:"
    "{%- elif message['role'] == 'assistant' -%} {{ message['content'] }}{{ eos_token }}\n\n"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def format_prompt(query: str) -> str:
    """The text a model sees before its answer to one question."""
    return PROMPT_TEMPLATE.format(query=query.strip())


def format_example(query: str, response: str, eos_token: str) -> tuple[str, str]:
    """``(prompt_text, full_text)``: the full text is prompt + response + EOS."""
    prompt = format_prompt(query)
    return prompt, prompt + RESPONSE_PREFIX + response.strip() + eos_token


def render_prompt(messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
    """Renders ``messages`` into one prompt string (see the module docstring for the format).

    A user turn already ends with the ``Assistant:`` cue, so ``add_generation_prompt`` only
    matters when the conversation ends with an assistant turn or a system message.
    """
    out: list[str] = []
    ends_with_cue = False
    for message in messages:
        content = message.content.strip()
        if message.role == "user":
            out.append(f"{USER_PREFIX}{content}\n\n{ASSISTANT_PREFIX}")
            ends_with_cue = True
        elif message.role == "assistant":
            if not ends_with_cue:
                out.append(ASSISTANT_PREFIX)
            out.append(f" {content}\n\n")
            ends_with_cue = False
        else:  # system (and any unknown role): plain text before the dialogue
            out.append(f"{content}\n\n")
            ends_with_cue = False
    if add_generation_prompt and not ends_with_cue:
        out.append(ASSISTANT_PREFIX)
    return "".join(out)


def cut_at_stop(text: str, stops: Iterable[str] = STOP_SEQUENCES) -> str:
    """Drops everything from the first stop sequence on, and surrounding whitespace."""
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut].strip()


def count_tokens(text: str) -> int:
    """A whitespace token count: the estimate used where a server does not report usage."""
    return len(text.split())
