"""A transformers causal LM in this process, from a local directory (no hub downloads).

For a model trained by the trainer service, or any ``save_pretrained`` directory. One model
serves one ``generate`` at a time (a lock): a second concurrent generate would only fight for the
same cores or GPU. Generation runs in a worker thread so the service's event loop keeps serving.

The prompt is built with the tokenizer's chat template when it has one (the trainer's tiny model
carries the project's template), else with ``stablealign.backends.template`` — the same text the
trainer trains on and the tgi backend sends. Sampling is seeded per call (the request's seed,
else a hash of the prompt) with the global RNG forked, so the same request gives the same text.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from stablealign.backends.base import ChatBackend, ChatRequest, Completion, RetryPolicy
from stablealign.backends.template import count_tokens, cut_at_stop, render_prompt
from stablealign.errors import ConfigError
from stablealign.logs import get_logger

log = get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128


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


class HFChatBackend(ChatBackend):
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local path, generating one request at a time."""

    name = "hf"

    def __init__(self, model_path: str | Path, *, device: str = "cpu",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_concurrency: int = 64,
                 retry: RetryPolicy | None = None) -> None:
        path = check_model_dir(model_path)
        super().__init__(str(path), max_concurrency=max_concurrency, retry=retry or RetryPolicy(attempts=1,
                                                                                                timeout=600.0))
        self.path = path
        self.device = device
        self.max_new_tokens = max_new_tokens
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = asyncio.Lock()

    def _load(self) -> None:
        if self._model is not None:
            return
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
        log.info("backend.hf_loaded", extra={"path": str(self.path), "device": self.device,
                                             "params": sum(p.numel() for p in model.parameters())})

    def _prompt_ids(self, request: ChatRequest) -> tuple[Any, str]:
        """Token ids (1 x n tensor) of the prompt and its text, via the chat template if there is one."""
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        tokenizer = self._tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # The template writes any BOS itself; do not let the tokenizer add a second one.
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            text = render_prompt(request.messages)
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
        return ids, text

    def _generate(self, request: ChatRequest) -> Completion:
        import torch

        self._load()
        tokenizer, model = self._tokenizer, self._model
        ids, text = self._prompt_ids(request)
        max_new = max(1, min(request.max_tokens, self.max_new_tokens))
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and ids.shape[1] + max_new > limit:  # keep the end of the prompt, next to the answer
            ids = ids[:, -(limit - max_new):]
        ids = ids.to(self.device)
        sample = request.temperature > 0
        seed = request.seed if request.seed is not None else int.from_bytes(
            hashlib.sha256(text.encode("utf-8")).digest()[:4], "big")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": sample, "pad_token_id": pad,
                                  "attention_mask": torch.ones_like(ids)}
        if sample:
            kwargs["temperature"] = request.temperature
        devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed % (2 ** 63))
            output = model.generate(ids, **kwargs)
        new_tokens = output[0, ids.shape[1]:]
        answer = cut_at_stop(tokenizer.decode(new_tokens, skip_special_tokens=True))
        return Completion(text=answer, model=self.model, prompt_tokens=int(ids.shape[1]),
                          completion_tokens=int(new_tokens.shape[0]) or count_tokens(answer))

    async def _chat_once(self, request: ChatRequest) -> Completion:
        async with self._lock:
            return await asyncio.to_thread(self._generate, request)
