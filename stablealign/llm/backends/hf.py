"""A transformers causal LM in this process, from a local directory or a pulled model (no hub downloads).

For a model trained by the trainer service, any ``save_pretrained`` directory, or a known model's
name (``stablealign.llm.models``: e.g. ``smollm2-135m-instruct`` once pulled). Requests are served by
a continuous-batching engine (``stablealign.llm.backends.batching``): concurrent calls are decoded
together in one worker thread, which is what makes a CPU (or one GPU) worth sharing between many
SANDBOX agents, and keeps the service's event loop free.

The prompt is built with the tokenizer's chat template when it has one (the trainer's tiny model
carries the project's template), else with ``stablealign.llm.prompt_format`` — the same text the
trainer trains on and the tgi backend sends. Sampling is seeded per request (the request's seed,
else a hash of the prompt) with a generator of its own, so the same request gives the same text
whatever else is being decoded beside it.

Ratings are read from probabilities (``rates_from_probabilities``): after the prompt and the
reply prefix ``Rating: ``, the next-token log-probabilities of the digits 1..scale give a
``DigitDistribution`` whose argmax is the rating; the reason is then generated after
``Rating: <n> ### Reason:``. A small model that cannot keep to the reply format still rates. The
digit and the reason come from one request to the engine (``GenerationRequest.choose``/``then``):
the prompt is prefilled once, the likeliest digit and the mark are fed, the reason follows.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stablealign.core.errors import BackendError, ConfigError
from stablealign.core.logs import get_logger
from stablealign.llm.backends.base import (
    ChatBackend,
    ChatRequest,
    Completion,
    DigitDistribution,
    RatedCompletion,
    RetryPolicy,
)
from stablealign.llm.backends.batching import (
    BatchingEngine,
    EngineSettings,
    GenerationRequest,
    engine_settings,
)
from stablealign.llm.prompt_format import STOP_SEQUENCES, count_tokens, cut_at_stop, render_prompt

log = get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
RATING_PREFIX = "Rating: "
REASON_MARK = " ### Reason:"
# One call may wait its turn behind a full batch on a CPU for minutes; the world's deadline for local
# models (WorldSettings.local_request_timeout_seconds, 30 min) is the one that matters.
HF_CALL_TIMEOUT_SECONDS = 1800.0


def check_model_dir(model_path: str | Path) -> Path:
    """The model directory, or ConfigError saying what is missing."""
    if not model_path:
        raise ConfigError("hf backend needs a model path (a local directory written by save_pretrained)")
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"hf backend: model path {str(path)!r} is not a directory (models are loaded from "
                          "local files only; nothing is downloaded)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"hf backend: {str(path)!r} has no config.json; is it a save_pretrained directory?")
    return path


def model_name(name_or_path: str | Path) -> str:
    """The name completions report: a known model's name, else the directory's name."""
    from stablealign.llm.models import known_model

    text = str(name_or_path).strip()
    known = known_model(text)
    if known is not None:
        return known.name
    return Path(text).expanduser().resolve().name or text


@dataclass(frozen=True)
class RatingPrompt:
    """What a probability rating needs: the prompt up to the digit and each digit's token id."""

    ids: list[int]  # chat prompt + reply prefix, the rating digit comes next
    digit_ids: dict[int, int]  # digit -> token id of the token that follows ``ids``
    chat_text: str  # the chat prompt alone (generation prompt added)
    separator: str  # what the template writes between the generation prompt and the reply
    chat_tokens: int
    mark_ids: list[int]  # the reason mark's tokens, fed after the digit


class HFChatBackend(ChatBackend):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local path, served by a batching engine."""

    name = "hf"
    rates_from_probabilities = True

    def __init__(self, model_path: str | Path, *, device: str = "cpu",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_concurrency: int = 64,
                 retry: RetryPolicy | None = None, max_batch: int | None = None) -> None:
        from stablealign.llm.models import resolve_model_path

        # An empty name fails in check_model_dir (resolved, it would be ".").
        path = check_model_dir(resolve_model_path(model_path) if str(model_path or "").strip() else "")
        super().__init__(model_name(model_path), max_concurrency=max_concurrency,
                         retry=retry or RetryPolicy(attempts=1, timeout=HF_CALL_TIMEOUT_SECONDS))
        self.path = path
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.settings: EngineSettings = engine_settings(max_batch=max_batch)
        self._model: Any = None
        self._tokenizer: Any = None
        self._engine: BatchingEngine | None = None
        self._load_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ loading and prompts (threads)

    def _load(self) -> None:
        with self._load_lock:
            if self._engine is not None:
                return
            if self._closed:
                raise BackendError("hf: the backend is closed")
            try:
                from transformers import AutoModelForCausalLM, AutoTokenizer
            except ImportError as exc:
                raise ConfigError(f"hf backend needs the `ml` extra (torch, transformers): {exc}") from exc
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"hf backend: cannot load a model from {str(self.path)!r}: {exc}") from exc
            model.to(self.device)
            model.eval()
            self._tokenizer, self._model = tokenizer, model
            self._engine = BatchingEngine(model, tokenizer, settings=self.settings, device=self.device)
            log.info("backend.hf_loaded", extra={"path": str(self.path), "model": self.model, "device": self.device,
                                                 "params": sum(p.numel() for p in model.parameters()),
                                                 "max_batch": self.settings.max_batch})

    def _templated(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def _chat_text(self, request: ChatRequest) -> str:
        if self._templated():
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return render_prompt(request.messages)

    def _encode(self, text: str) -> list[int]:
        # A chat template writes any BOS itself; do not let the tokenizer add a second one.
        return list(self._tokenizer(text, add_special_tokens=not self._templated())["input_ids"])

    def _prompt_ids(self, request: ChatRequest) -> tuple[list[int], str]:
        """Token ids of the prompt and its text, via the chat template if there is one."""
        self._load()
        text = self._chat_text(request)
        return self._encode(text), text

    def _reply_separator(self, request: ChatRequest) -> str:
        """What the chat format puts between the generation prompt and an assistant reply
        ("" for ChatML, " " for the project's ``Human:/Assistant:`` format)."""
        if not self._templated():
            return " "
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        prompt = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        probe = "Rating: 5"
        try:
            full = self._tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": probe}],
                                                       tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses assistant turns: assume nothing between
            return ""
        if full.startswith(prompt):
            index = full.find(probe, len(prompt))
            if index != -1 and index - len(prompt) <= 4:
                return full[len(prompt):index]
        return ""

    def _rating_prompt(self, request: ChatRequest, scale: int) -> RatingPrompt | None:
        """The prompt whose next token is the rating digit, and each digit's token id; None when
        the tokenizer does not write every digit as one token after the prefix."""
        self._load()
        chat_text = self._chat_text(request)
        separator = self._reply_separator(request)
        base = chat_text + separator
        # "Rating: 5" is ['R', 'ating', ':', ' ', '5'] for SmolLM2; a tokenizer that merges the space
        # into the digit (' 5') needs the prompt to stop at the colon.
        for prefix, digit_text in ((RATING_PREFIX, "{}"), (RATING_PREFIX.rstrip(), " {}")):
            ids = self._encode(base + prefix)
            digit_ids: dict[int, int] = {}
            for digit in range(1, scale + 1):
                full = self._encode(base + prefix + digit_text.format(digit))
                if len(full) == len(ids) + 1 and full[:len(ids)] == ids:
                    digit_ids[digit] = full[-1]
            if len(digit_ids) == scale and len(set(digit_ids.values())) == scale:
                # The mark as the tokenizer writes it after a digit: "Rating: 5 ### Reason:" minus "Rating: 5".
                digit = next(iter(digit_ids))
                with_digit = self._encode(base + prefix + digit_text.format(digit))
                marked = self._encode(base + prefix + digit_text.format(digit) + REASON_MARK)
                mark_ids = (marked[len(with_digit):] if marked[:len(with_digit)] == with_digit
                            else list(self._tokenizer(REASON_MARK, add_special_tokens=False)["input_ids"]))
                return RatingPrompt(ids, digit_ids, chat_text, separator, len(self._encode(chat_text)), mark_ids)
        return None

    # ------------------------------------------------------------------ serving

    def _engine_or_fail(self) -> BatchingEngine:
        if self._engine is None:
            raise BackendError("hf: the model is not loaded")
        return self._engine

    def _max_new(self, request: ChatRequest) -> int:
        return max(1, min(request.max_tokens, self.max_new_tokens))

    @staticmethod
    def _seed(request: ChatRequest, text: str) -> int:
        if request.seed is not None:
            return request.seed
        return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big")

    async def _chat_once(self, request: ChatRequest) -> Completion:
        ids, text = await asyncio.to_thread(self._prompt_ids, request)
        generation = await self._engine_or_fail().generate(GenerationRequest(
            ids, self._max_new(request), temperature=request.temperature, seed=self._seed(request, text),
            stop=STOP_SEQUENCES))
        answer = cut_at_stop(generation.text)
        return Completion(text=answer, model=self.model, prompt_tokens=generation.prompt_tokens,
                          completion_tokens=len(generation.token_ids) or count_tokens(answer))

    async def _rate_once(self, request: ChatRequest, scale: int) -> RatedCompletion:
        """The digit distribution at the rating's position, then a generated reason (module docstring)."""
        prompt = await asyncio.to_thread(self._rating_prompt, request, scale)
        engine = self._engine_or_fail()
        if prompt is None:  # digits are not single tokens here: a plain reply, parsed by the caller
            log.warning("backend.hf_rating_digits_unavailable", extra={"model": self.model})
            return RatedCompletion(await self._chat_once(request))
        choose = tuple(prompt.digit_ids.values())
        if not request.rating_reason:
            logprobs = await engine.next_token_logprobs(prompt.ids, choose)
            digits = DigitDistribution.from_logprobs({d: logprobs[t] for d, t in prompt.digit_ids.items()}, scale)
            if digits is None:
                return RatedCompletion(await self._chat_once(request))
            return RatedCompletion(Completion(text=f"{RATING_PREFIX}{digits.score}", model=self.model,
                                              prompt_tokens=len(prompt.ids), completion_tokens=1), digits)
        # One prefill for both: the digit is read at the rating's position, then the likeliest digit and
        # the reason mark are fed and the reason is generated after them (module docstring).
        generation = await engine.generate(GenerationRequest(
            prompt.ids, self._max_new(request), temperature=request.temperature,
            seed=self._seed(request, prompt.chat_text), stop=STOP_SEQUENCES, choose=choose,
            then=tuple(prompt.mark_ids)))
        digits = DigitDistribution.from_logprobs(
            {d: (generation.choices or {}).get(t, float("-inf")) for d, t in prompt.digit_ids.items()}, scale)
        if digits is None:
            return RatedCompletion(await self._chat_once(request))
        scaffold = f"{RATING_PREFIX}{digits.score}{REASON_MARK}"
        text = f"{scaffold} {cut_at_stop(generation.text)}"
        written = len(prompt.ids) - prompt.chat_tokens + generation.forced_tokens  # scaffold, as if written
        return RatedCompletion(Completion(text=text, model=self.model, prompt_tokens=prompt.chat_tokens,
                                          completion_tokens=max(0, written) + len(generation.token_ids)), digits)

    async def aclose(self) -> None:
        """Stops the engine's worker; requests in flight fail with BackendError."""
        self._closed = True
        engine = self._engine
        if engine is not None:
            await asyncio.to_thread(engine.close)
