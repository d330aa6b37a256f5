"""Tokenising training, inference and evaluation text in the one prompt format (``stablealign.llm.prompt_format``).

Everything goes through ``encode_prompt`` / ``encode_example``; the tiny model's tokenizer carries
the format as its ``chat_template`` so that ``tokenizer.apply_chat_template`` agrees with
``format_prompt`` — except for a model with a chat template of its own (an instruct model:
SmolLM2's ChatML), which keeps its own format everywhere (``uses_own_chat_template``). Every training
response ends with the EOS token (the original had none, so its models never learned to stop).

Tokenisation: prompt and response are tokenised *separately* and concatenated, so that the boundary
between prompt tokens (masked out of the loss) and response tokens is exact whatever merges a BPE
tokenizer would make across it.
"""

from __future__ import annotations

from typing import Any

from stablealign.llm.prompt_format import CHAT_TEMPLATE, RESPONSE_PREFIX, format_prompt

# Realignment prompts: the question, the agent's own draft and its partners' feedback (DESIGN §1).
REALIGNMENT_QUERY_TEMPLATE = (
    "{question}\n\n"
    "Your earlier answer: {draft}\n\n"
    "Feedback from others:\n{feedback}\n\n"
    "Write a better answer that takes the feedback into account."
)
# Self-Critic prompts: the question and an answer to judge; the responses are partners' feedback.
CRITIC_QUERY_TEMPLATE = (
    "{question}\n\n"
    "An answer to judge: {draft}\n\n"
    "How socially acceptable is this answer? Give a rating from 1 to 7 and a reason."
)

def format_realignment_query(question: str, draft: str, feedback: list[str]) -> str:
    """The one template for Realignment prompts: q + draft + partners' feedback."""
    lines = "\n".join(f"- {text.strip()}" for text in feedback if text and text.strip()) or "- (none)"
    return REALIGNMENT_QUERY_TEMPLATE.format(question=question.strip(), draft=draft.strip(), feedback=lines)


def format_critic_query(question: str, draft: str) -> str:
    """The one template for Self-Critic prompts: q + the answer being judged."""
    return CRITIC_QUERY_TEMPLATE.format(question=question.strip(), draft=draft.strip())


def uses_own_chat_template(tokenizer: Any) -> bool:
    """Whether the model brings its own chat template (an instruct model such as SmolLM2's ChatML).

    Such a model is trained, asked and evaluated in *its* format — the one the SANDBOX's hf backend
    used to make its records — so that training does not teach it a second format. Models without
    one (or with the project's template, like the tiny model) use the HH format above.
    """
    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and template != CHAT_TEMPLATE


def prompt_text(tokenizer: Any, query: str) -> str:
    """The text a model sees before its answer, in the model's own chat template if it has one."""
    if uses_own_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": query.strip()}],
                                             add_generation_prompt=True, tokenize=False)
    return format_prompt(query)


def encode_prompt(tokenizer: Any, query: str) -> list[int]:
    """Token ids of the prompt, with the tokenizer's BOS when it adds one (a chat template writes its own)."""
    own = uses_own_chat_template(tokenizer)
    return list(tokenizer(prompt_text(tokenizer, query), add_special_tokens=not own)["input_ids"])


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Token ids of one response followed by EOS (no BOS); under a chat template, EOS ends the turn."""
    prefix = "" if uses_own_chat_template(tokenizer) else RESPONSE_PREFIX
    ids = list(tokenizer(prefix + response.strip(), add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; training responses must end with one")
    return ids + [tokenizer.eos_token_id]


def encode_example(tokenizer: Any, query: str, response: str, max_length: int) -> tuple[list[int], int, bool]:
    """``(input_ids, prompt_length, truncated)`` for one (query, response) pair.

    Over-long examples keep the start of the response: the prompt is cut from the left (its end,
    next to the answer, matters most) so that at least half of ``max_length`` is left for the
    response, then the response is cut from the right (dropping EOS only when it must).
    """
    prompt = encode_prompt(tokenizer, query)
    response_ids = encode_response(tokenizer, response)
    truncated = False
    if len(prompt) + len(response_ids) > max_length:
        truncated = True
        keep_prompt = min(len(prompt), max(1, max_length - len(response_ids), max_length // 2))
        if keep_prompt < len(prompt):
            bos = prompt[:1] if tokenizer.bos_token_id is not None and prompt[:1] == [tokenizer.bos_token_id] else []
            prompt = bos + prompt[len(prompt) - keep_prompt + len(bos):]
        response_ids = response_ids[: max_length - len(prompt)]
    return prompt + response_ids, len(prompt), truncated
