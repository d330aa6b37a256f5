"""Continuous batching for a transformers causal LM: many concurrent requests, one decode loop.

Why: on a CPU (or one GPU) a decoding step over 32 rows costs little more than a step over one —
the weights are read once per step either way — so serving concurrent SANDBOX calls one at a time
(``model.generate`` behind a lock) left most of the machine idle. Here one worker thread owns the
model and runs a decode loop over a *running batch*; ``asyncio`` callers submit requests and await
futures that the worker resolves with ``loop.call_soon_threadsafe``.

How a step goes:

* **Join.** Requests that arrived since the last step are prefilled together (left-padded, with
  an attention mask and per-row position ids, so padding changes nothing a row sees), then their
  KV caches are merged into the running batch: whichever side is shorter along the sequence axis
  is left-padded with zero keys/values and attention-mask zeros. Every row stays right-aligned, so
  one position per row and one cache length for the whole batch suffice.
* **Decode.** One forward over the last token of every running row; each row then picks its next
  token — greedy, or sampled with its *own* ``torch.Generator`` seeded from the request (so the
  same request gives the same text whatever else is in the batch).
* **Leave.** A row stops at its own EOS ids, stop strings or token budget; finished rows are
  selected out of the cache and leading columns that only padding uses are trimmed, so a finished
  request costs nothing more.

Log-probabilities of the next token after a prompt (``next_token_logprobs``, for ratings read
from probabilities) ride the same prefill batches without joining the decode batch.

A model error fails only the futures of the requests in the failing forward (a failing prefill of
several newcomers is retried one by one, so one bad prompt does not fail its companions) with a
``BackendError``; the worker carries on. Greedy output is the same token sequence as the request
alone (up to float rounding: batched matmuls may sum in another order, which only matters at an
exact tie between the top two logits).

Two CPU costs of transformers' stock path are avoided (each a sizeable share of a full batch's
decoding step, docs/benchmarks.md; outputs unchanged): the KV cache grows into spare room instead of being
copied by ``torch.cat`` at every step (``_growing_layer_class``), and with a padding mask the
grouped-query K/V heads stay grouped inside SDPA instead of being copied to every query head
(``use_grouped_sdpa``; off with ``STABLEALIGN_HF_GROUPED_SDPA=false``).

Settings (``EngineSettings``): ``STABLEALIGN_HF_MAX_BATCH`` (32), ``STABLEALIGN_HF_PREFILL_TOKENS``
(4096), ``STABLEALIGN_HF_STEP_JOIN`` (true), ``STABLEALIGN_HF_GROUPED_SDPA`` (true).

Dependence on transformers internals (4.57): merging and trimming caches reads and writes the
``keys``/``values`` tensors of ``DynamicLayer`` (``transformers.cache_utils``), the growing layer
subclasses it, and the grouped attention is registered with ``AttentionInterface`` /
``AttentionMaskInterface``. A model whose cache has other layer kinds (sliding windows) falls back
to joining between batches (newcomers wait until the running batch is empty).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from stablealign.core.batches import by_token_budget
from stablealign.core.config import Settings, load_settings
from stablealign.core.errors import BackendError
from stablealign.core.logs import get_logger
from stablealign.llm.prompt_format import STOP_SEQUENCES

log = get_logger(__name__)

ENV_PREFIX = "STABLEALIGN_HF_"


class EngineSettings(Settings):
    """``STABLEALIGN_HF_<FIELD>`` settings of the batching engine."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    max_batch: int = Field(32, ge=1, description="Rows decoded together at most; newcomers beyond it wait for a "
                                                 "row to finish.")
    prefill_tokens: int = Field(4096, ge=1, description=(
        "Padded prompt tokens per prefill forward (rows x longest prompt); a longer prompt goes alone."))
    step_join: bool = Field(True, description="Newcomers join the running batch between decoding steps (else "
                                              "only when the batch is empty).")
    # transformers' sdpa copies grouped-query K/V heads to every query head when there is a mask.
    grouped_sdpa: bool = Field(True, description="On a CPU, attention with a padding mask keeps grouped-query "
                                                 "K/V heads grouped inside SDPA.")
    # Reading a prompt is one large matrix product per layer, where a CPU's native bf16 runs about
    # twice as fast as float32; one new token per row is not, and stays in float32 (docs/benchmarks.md).
    prefill_dtype: str = Field("auto", pattern="^(auto|float32|bfloat16)$", description=(
        "Precision of prompt reading on a CPU: bfloat16, float32, or auto (bfloat16 where the CPU has "
        "native bf16 instructions). Decoding is float32 either way; the cache is converted after the prefill."))
    # A small model that starts repeating itself goes on until its token budget; what follows the
    # third copy carries nothing that the first two did not, and decoding it is the slowest work there is.
    loop_repeats: int = Field(3, ge=0, description=(
        "A completion ends once its last tokens are this many consecutive copies of one span of "
        "loop_min_span..loop_max_span tokens (finish reason \"repetition\"); 0 turns this off."))
    loop_min_span: int = Field(4, ge=1, description="Shortest repeated span that ends a completion.")
    loop_max_span: int = Field(32, ge=1, description="Longest repeated span looked for.")


def engine_settings(**overrides: Any) -> EngineSettings:
    """Settings from the environment, then ``overrides`` (None values ignored)."""
    return load_settings(EngineSettings, overrides, prefix=ENV_PREFIX)


@dataclass(frozen=True)
class GenerationRequest:
    """One completion: prompt token ids and how to continue them."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None  # sampling seed; None: a hash of the prompt ids
    stop: tuple[str, ...] = STOP_SEQUENCES  # text that ends the completion (EOS ids always do)
    # A rating and its reason in one prefill: the first new token is the likeliest of ``choose`` (their
    # log-probabilities come back in ``Generation.choices``), then ``then`` is fed as written, then the
    # completion goes on as usual. These forced tokens are not part of the returned tokens or text.
    choose: tuple[int, ...] = ()
    then: tuple[int, ...] = ()


@dataclass(frozen=True)
class Generation:
    """What the engine produced for one request."""

    token_ids: tuple[int, ...]  # new tokens, the final EOS included when there was one
    text: str  # the new tokens decoded without special tokens; not cut at the stop string
    prompt_tokens: int  # after cutting an over-long prompt
    finish_reason: str  # "eos" | "stop" | "length" | "repetition"
    choices: dict[int, float] | None = None  # log P(token | prompt) of each ``choose`` token, if asked
    forced_tokens: int = 0  # the chosen token and ``then``, fed before ``token_ids``


@dataclass(eq=False)
class _Job:
    """A submitted request, as the worker sees it."""

    kind: str  # "generate" | "logprobs"
    prompt: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    request: GenerationRequest | None = None
    wanted: tuple[int, ...] = ()  # token ids whose log-probabilities a "logprobs" job returns
    cancelled: bool = False  # set on the event loop when the caller stopped waiting


@dataclass(eq=False)
class _Row:
    """A request in the running batch: its generated tokens and the next token to feed."""

    job: _Job
    generator: Any  # torch.Generator, or None when greedy
    generated: list[int] = field(default_factory=list)
    next_position: int = 0  # position id of the token fed at the next step
    forced: int = 0  # leading tokens of ``generated`` the request fixed (``choose``/``then``)
    pending: list[int] = field(default_factory=list)  # ``then`` tokens still to feed
    choices: dict[int, float] | None = None

    @property
    def request(self) -> GenerationRequest:
        assert self.job.request is not None
        return self.job.request


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def default_seed(prompt_ids: Sequence[int]) -> int:
    """A stable seed from the prompt, so an unseeded sampled request still repeats itself."""
    digest = hashlib.sha256(",".join(map(str, prompt_ids)).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % (2 ** 63)


class BatchingEngine:
    """Serves ``generate`` and ``next_token_logprobs`` for one loaded model from one worker thread.

    ``model``: a transformers causal LM in eval mode on ``device``; ``tokenizer``: its tokenizer
    (for EOS ids, padding and stop strings). Thread-safe: any event loop, any thread may submit.
    """

    def __init__(self, model: Any, tokenizer: Any, *, settings: EngineSettings | None = None,
                 device: str = "cpu") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or engine_settings()
        self.device = device
        config = model.config
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        self.eos_ids = frozenset(self._eos_ids())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        generation_config = getattr(model, "generation_config", None)
        self.top_k = int(getattr(generation_config, "top_k", None) or 0)
        self.top_p = float(getattr(generation_config, "top_p", None) or 1.0)
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        # Worker-only state: the running batch.
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Any = None  # LongTensor [rows, cache length]: 1 where a row has a real token
        self._step_join = self.settings.step_join
        self.steps = 0  # decoding steps run (for tests and logs)
        self.max_rows_seen = 0
        self.grouped_sdpa = (self.settings.grouped_sdpa and str(device).startswith("cpu")
                             and use_grouped_sdpa(model))
        self.prefill_model = prefill_copy(model, self.settings.prefill_dtype, device)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        candidates: list[Any] = [self.tokenizer.eos_token_id]
        generation_config = getattr(self.model, "generation_config", None)
        candidates.append(getattr(generation_config, "eos_token_id", None))
        for value in candidates:
            if value is None:
                continue
            ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        return ids

    def stats(self) -> dict[str, Any]:
        """Settings and counters, for logs."""
        return {**self.settings.model_dump(), "steps": self.steps, "max_rows_seen": self.max_rows_seen,
                "step_join_active": self._step_join, "grouped_sdpa_active": self.grouped_sdpa,
                "prefill_bf16_active": self.prefill_model is not self.model}

    # ------------------------------------------------------------------ submitting (any thread)

    def _clip(self, prompt: Sequence[int], room: int) -> list[int]:
        """Keeps the end of a prompt that would not fit with ``room`` new tokens."""
        ids = [int(t) for t in prompt]
        if not ids:
            raise BackendError("hf: empty prompt")
        if self.max_positions and len(ids) + room > self.max_positions:
            ids = ids[-max(1, self.max_positions - room):]
        return ids

    def _submit(self, job: _Job) -> None:
        def on_done(future: asyncio.Future[Any]) -> None:
            if future.cancelled():
                job.cancelled = True

        job.future.add_done_callback(on_done)
        with self._cond:
            if self._closing:
                raise BackendError("hf: the generation engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hf-batching", daemon=True)
                self._thread.start()
            self._pending.append(job)
            self._cond.notify()

    async def generate(self, request: GenerationRequest) -> Generation:
        """The completion of ``request``, decoded alongside whatever else is running."""
        if request.max_new_tokens < 1:
            raise BackendError("hf: max_new_tokens must be >= 1")
        loop = asyncio.get_running_loop()
        forced = 1 + len(request.then) if request.choose else 0
        job = _Job("generate", self._clip(request.prompt_ids, request.max_new_tokens + forced), loop,
                   loop.create_future(), request=request)
        self._submit(job)
        return await job.future

    async def next_token_logprobs(self, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> dict[int, float]:
        """log P(token | prompt) for each of ``token_ids`` (a prefill only, batched with others)."""
        loop = asyncio.get_running_loop()
        job = _Job("logprobs", self._clip(prompt_ids, 1), loop, loop.create_future(),
                   wanted=tuple(int(t) for t in token_ids))
        self._submit(job)
        return await job.future

    def close(self, timeout: float = 30.0) -> None:
        """Stops the worker after its current forward; pending and running requests fail."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("backend.hf_engine_close_timeout", extra={"timeout_s": timeout})
            else:
                log.info("backend.hf_engine_closed", extra=self.stats())
        # The worker fails what it held on its way out; requests queued after it stopped fail here.
        self._fail_pending(BackendError("hf: the generation engine was closed"))

    # ------------------------------------------------------------------ the worker

    def _resolve(self, job: _Job, result: Any = None, error: BaseException | None = None) -> None:
        try:
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting any more
            pass

    def _fail_pending(self, error: BaseException) -> None:
        with self._cond:
            jobs = list(self._pending)
            self._pending.clear()
        for job in jobs:
            self._resolve(job, error=error)

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._pending and not self._rows and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        break
                    admitted = self._admit()
                try:
                    if admitted:
                        self._join(admitted)
                except Exception as exc:  # noqa: BLE001 - the worker must survive anything
                    log.exception("backend.hf_engine_error")
                    error = BackendError(f"hf: generation failed: {type(exc).__name__}: {exc}")
                    for job in admitted:  # those already answered keep their answer
                        self._resolve(job, error=error)
                    self._fail_rows(error)  # the running batch may have been half merged
                try:
                    if self._rows:
                        self._decode_step()
                except Exception as exc:  # noqa: BLE001
                    log.exception("backend.hf_engine_error")
                    self._fail_rows(BackendError(f"hf: generation failed: {type(exc).__name__}: {exc}"))
        self._fail_rows(BackendError("hf: the generation engine was closed"))
        self._fail_pending(BackendError("hf: the generation engine was closed"))

    def _admit(self) -> list[_Job]:
        """Newcomers for this step (called under the lock): logprob jobs and as many generations as
        there are free rows (none while a batch runs if step joining is off)."""
        free = self.settings.max_batch - len(self._rows)
        if self._rows and not self._step_join:
            free = 0
        admitted: list[_Job] = []
        kept: deque[_Job] = deque()
        while self._pending and len(admitted) < self.settings.max_batch:
            job = self._pending.popleft()
            if job.cancelled:
                continue
            if job.kind == "generate":
                if free <= 0:
                    kept.append(job)
                    continue
                free -= 1
            admitted.append(job)
        kept.extend(self._pending)
        self._pending = kept
        return admitted

    def _chunks(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Prefill groups of similar lengths within the padded-token budget."""
        return by_token_budget(sorted(jobs, key=lambda j: len(j.prompt)), lambda j: len(j.prompt),
                               self.settings.prefill_tokens)

    def _join(self, jobs: list[_Job]) -> None:
        for chunk in self._chunks(jobs):
            try:
                self._prefill(chunk)
            except _AfterForwardError:
                raise
            except Exception as exc:  # noqa: BLE001 - the model failed on this chunk
                if len(chunk) == 1:
                    self._prefill_failed(chunk[0], exc)
                    continue
                # Find the culprit: one by one, so that its companions still get their answers.
                for job in chunk:
                    try:
                        self._prefill([job])
                    except _AfterForwardError:
                        raise
                    except Exception as single:  # noqa: BLE001
                        self._prefill_failed(job, single)

    def _prefill_failed(self, job: _Job, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        log.warning("backend.hf_prefill_failed", extra={"prompt_tokens": len(job.prompt), "error": error[:300]})
        self._resolve(job, error=BackendError(f"hf: the model failed on this prompt: {error}"))

    def _new_cache(self) -> Any:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
            cache.layers = [_growing_layer_class()() for _ in cache.layers]
        return cache

    def _forward(self, input_ids: Any, mask: Any, positions: Any, cache: Any, cache_position: Any,
                 model: Any = None) -> Any:
        """Next-token logits (float32, [rows, vocab]) of the last position of each row."""
        out = (model or self.model)(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         cache_position=cache_position, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def _prefill(self, jobs: list[_Job]) -> None:
        """Prefills ``jobs`` together: answers the logprob jobs and starts the generations.

        A failing forward raises here (the caller retries the jobs one by one); what comes after
        the forward does not touch the model.
        """
        import torch

        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        width = max(len(j.prompt) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            ids[i, width - len(job.prompt):] = torch.tensor(job.prompt, dtype=torch.long)
            mask[i, width - len(job.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = self._new_cache()
        logits = self._forward(ids, mask, positions, cache, torch.arange(width, device=self.device),
                               model=self.prefill_model)
        if self.prefill_model is not self.model:
            for layer in _layers(cache):  # decoding appends float32 keys and values
                layer.keys, layer.values = layer.keys.float(), layer.values.float()
        try:
            self._start(jobs, logits, cache, mask)
        except Exception as exc:  # an engine bug, not the model's: these jobs fail, the batch goes on
            raise _AfterForwardError(exc) from exc

    def _start(self, jobs: list[_Job], logits: Any, cache: Any, mask: Any) -> None:
        import torch

        kept: list[int] = []
        new_rows: list[_Row] = []
        for i, job in enumerate(jobs):
            if job.kind == "logprobs":
                logprobs = torch.log_softmax(logits[i], dim=-1)
                self._resolve(job, {t: float(logprobs[t]) for t in job.wanted})
                continue
            request = job.request
            assert request is not None
            generator = None
            if request.temperature > 0:
                generator = torch.Generator(device=self.device)
                seed = request.seed if request.seed is not None else default_seed(job.prompt)
                generator.manual_seed(int(seed) % (2 ** 63))
            row = _Row(job, generator, next_position=len(job.prompt))
            if request.choose:
                logprobs = torch.log_softmax(logits[i], dim=-1)
                row.choices = {int(t): float(logprobs[t]) for t in request.choose}
                token = max(row.choices, key=row.choices.__getitem__)  # ties: the first, as DigitDistribution
                row.pending = [int(t) for t in request.then]
                forced = True
            else:
                token, forced = self._pick(logits[i:i + 1], [row])[0], False
            if not self._advance(row, token, forced=forced):
                kept.append(i)
                new_rows.append(row)
        if not new_rows:
            return
        if len(kept) < len(jobs):
            cache.batch_select_indices(torch.tensor(kept, device=self.device))
            mask = mask[kept]
        self._merge(cache, _trim(cache, mask), new_rows)

    def _merge(self, cache: Any, mask: Any, rows: list[_Row]) -> None:
        """Adds prefilled rows to the running batch, left-padding the shorter side's cache."""
        import torch
        import torch.nn.functional as F

        if self._cache is None or not self._rows:
            self._cache, self._mask, self._rows = cache, mask, list(rows)
            self._check_cache_layers()
            self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old, new in zip(_layers(self._cache), _layers(cache), strict=True):
            for name in ("keys", "values"):
                a, b = getattr(old, name), getattr(new, name)
                a = F.pad(a, (0, 0, width - old_len, 0))  # [rows, heads, seq, dim]: pad seq on the left
                b = F.pad(b, (0, 0, width - new_len, 0))
                setattr(old, name, torch.cat([a, b], dim=0))
        self._mask = torch.cat([F.pad(self._mask, (width - old_len, 0)), F.pad(mask, (width - new_len, 0))], dim=0)
        self._rows.extend(rows)
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))

    def _check_cache_layers(self) -> None:
        from transformers.cache_utils import DynamicLayer

        plain = (DynamicLayer, _growing_layer_class())
        if self._step_join and any(type(layer) not in plain for layer in self._cache.layers):
            self._step_join = False  # sliding-window layers keep a ring of positions: no left-padding merge
            log.info("backend.hf_engine_batch_level_joining", extra={"reason": "cache layers are not DynamicLayer"})

    def _decode_step(self) -> None:
        import torch

        self._drop([i for i, row in enumerate(self._rows) if row.job.cancelled])
        if not self._rows:
            return
        rows = self._rows
        ids = torch.tensor([[row.generated[-1]] for row in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[row.next_position] for row in rows], dtype=torch.long, device=self.device)
        length = self._mask.shape[1]
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=self._mask.dtype,
                                                       device=self._mask.device)], dim=1)
        logits = self._forward(ids, self._mask, positions, self._cache,
                               torch.tensor([length], device=self.device))
        self.steps += 1
        tokens = self._pick(logits, rows)
        finished = []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.next_position += 1
            forced = bool(row.pending)
            if self._advance(row, row.pending.pop(0) if forced else token, forced=forced):
                finished.append(i)
        self._drop(finished)

    def _drop(self, indices: list[int]) -> None:
        """Removes rows ``indices`` from the running batch (their futures are settled elsewhere)."""
        import torch

        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self._mask = self._mask[keep]
        self._rows = [self._rows[i] for i in keep]
        self._mask = _trim(self._cache, self._mask)

    def _fail_rows(self, error: BaseException) -> None:
        for row in self._rows:
            self._resolve(row.job, error=error)
        self._rows, self._cache, self._mask = [], None, None

    def _pick(self, logits: Any, rows: list[_Row]) -> list[int]:
        """Next token per row: argmax for greedy rows, a draw from each row's own generator else.

        The sampled rows are filtered and normalised together; each draws one uniform number from
        its own generator and takes the token where the cumulative distribution passes it, so a
        row's tokens depend on its seed and logits only, whatever else is in the batch.
        """
        import torch

        chosen = logits.argmax(dim=-1).tolist()
        sampled = [i for i, row in enumerate(rows) if row.generator is not None]
        if not sampled:
            return [int(t) for t in chosen]
        temperatures = torch.tensor([max(rows[i].request.temperature, 1e-5) for i in sampled],
                                    dtype=logits.dtype, device=logits.device)
        probs, ids = sampling_candidates(logits[sampled] / temperatures[:, None], self.top_k, self.top_p)
        cdf = probs.cumsum(dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=rows[i].generator, device=logits.device) for i in sampled])
        draws = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1).to(cdf.dtype), right=True)
        tokens = ids.gather(1, draws.clamp(max=cdf.shape[-1] - 1)).squeeze(1)
        for i, token in zip(sampled, tokens.tolist(), strict=True):
            chosen[i] = token
        return [int(t) for t in chosen]

    def _advance(self, row: _Row, token: int, *, forced: bool = False) -> bool:
        """Appends ``token`` to the row; if that ends it, settles its future and returns True. A forced
        token (the request's ``choose``/``then``) never ends a row: the completion starts after it."""
        row.generated.append(token)
        if forced:
            row.forced += 1
            return False
        request = row.request
        reason = ""
        if token in self.eos_ids:
            reason = "eos"
        elif request.stop and self._hit_stop(row):
            reason = "stop"
        elif len(row.generated) - row.forced >= request.max_new_tokens:
            reason = "length"
        elif self.settings.loop_repeats and ends_in_loop(
                row.generated, row.forced, self.settings.loop_repeats, self.settings.loop_min_span,
                self.settings.loop_max_span):
            reason = "repetition"
        elif row.job.cancelled:
            reason = "cancelled"
        if not reason:
            return False
        if reason != "cancelled":
            own = row.generated[row.forced:]
            text = self.tokenizer.decode(own, skip_special_tokens=True)
            self._resolve(row.job, Generation(tuple(own), text, len(row.job.prompt), reason, row.choices, row.forced))
        return True

    def _hit_stop(self, row: _Row) -> bool:
        # Only the tail can hold a stop string that the latest token completed; a token is at least
        # one byte, so (longest stop + 2) tokens cover it.
        stops = [s for s in row.request.stop if s]
        if not stops:
            return False
        span = max(len(s.encode("utf-8")) for s in stops) + 2
        tail = self.tokenizer.decode(row.generated[row.forced:][-span:], skip_special_tokens=True)
        return any(stop in tail for stop in stops)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX), per oneDNN."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_native_on(device_kind: str) -> bool:
    """Whether a device of this kind ("cuda", "cpu", ...) computes bf16 matrix products natively: CUDA
    with bf16, or a CPU with AVX512-BF16 or AMX. Elsewhere bf16 would be emulated, slower than float32."""
    import torch

    if device_kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return device_kind == "cpu" and native_bf16()


def prefill_copy(model: Any, dtype: str, device: str) -> Any:
    """The model that reads prompts: ``model`` itself, or a bfloat16 copy of it (see ``prefill_dtype``)."""
    import copy

    import torch

    on_cpu = str(device).startswith("cpu")
    if not on_cpu or not isinstance(model, torch.nn.Module) or next(model.parameters()).dtype != torch.float32:
        return model
    if dtype == "float32" or (dtype == "auto" and not native_bf16()):
        return model
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def sampling_candidates(scores: Any, top_k: int, top_p: float) -> tuple[Any, Any]:
    """The tokens a sampled row may draw and their probabilities, [rows, candidates] each: the ``top_k``
    best-scoring tokens (0: all), then the smallest set of them whose probability reaches ``top_p``
    (the others get probability 0), renormalised."""
    import torch

    if 0 < top_k < scores.shape[-1]:
        scores, ids = torch.topk(scores, top_k, dim=-1)  # sorted, best first
    else:
        ids = torch.arange(scores.shape[-1], device=scores.device).expand(scores.shape[0], -1)
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, ids


def ends_in_loop(tokens: Sequence[int], start: int, repeats: int, min_span: int, max_span: int) -> bool:
    """Whether ``tokens[start:]`` ends in ``repeats`` consecutive copies of one span of ``min_span`` to
    ``max_span`` tokens (checked each step, so only spans the last token completes are looked at)."""
    end = len(tokens)
    for span in range(min_span, min(max_span, (end - start) // repeats) + 1):
        if tokens[end - 1] != tokens[end - 1 - span]:  # most spans fail here, before any slice is copied
            continue
        tail = tokens[end - span:]
        if all(tokens[end - (k + 1) * span:end - k * span] == tail for k in range(1, repeats)):
            return True
    return False


class _AfterForwardError(Exception):
    """A failure after a successful prefill forward: not worth retrying the jobs one by one."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")


def _trim(cache: Any, mask: Any) -> Any:
    """Drops leading cache columns that no row uses (left by rows that finished); returns the mask."""
    used = mask.any(dim=0)
    first = int(used.long().argmax()) if bool(used.any()) else 0
    if first == 0:
        return mask
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, first:, :]
        layer.values = layer.values[:, :, first:, :]
    return mask[:, first:]


_GROWING_LAYER: type | None = None
CACHE_SLACK = 64  # spare positions a growing layer allocates: one copy every 64 steps instead of every step


def _growing_layer_class() -> type:
    """``DynamicLayer`` that writes each step's keys/values into spare room instead of concatenating.

    Why: ``DynamicLayer.update`` copies the whole cache with ``torch.cat`` at every step (about an
    eighth of a batched decoding step on a CPU). Here the cache lives in a buffer with
    ``CACHE_SLACK`` spare positions and ``keys``/``values`` are views of it. Whoever replaces
    ``keys``/``values`` (``batch_select_indices``, the engine's merge and trim) simply leaves the
    buffer: the next update sees that the tensors are no longer its views and copies them into a
    new buffer.
    """
    global _GROWING_LAYER
    if _GROWING_LAYER is not None:
        return _GROWING_LAYER
    import torch
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            self._buffers: tuple[Any, Any] | None = None
            self._views: tuple[Any, Any] | None = None

        def update(self, key_states: Any, value_states: Any, cache_kwargs: Any = None) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states)
            length, new = self.get_seq_length(), key_states.shape[-2]
            ours = self._views is not None and self.keys is self._views[0] and self.values is self._views[1]
            if not ours or self._buffers is None or length + new > self._buffers[0].shape[-2]:
                self._buffers = (self._grow(self.keys, key_states, length + new),
                                 self._grow(self.values, value_states, length + new))
            keys, values = self._buffers
            keys[:, :, length:length + new] = key_states
            values[:, :, length:length + new] = value_states
            self.keys, self.values = keys[:, :, :length + new], values[:, :, :length + new]
            self._views = (self.keys, self.values)
            return self.keys, self.values

        @staticmethod
        def _grow(old: Any, states: Any, needed: int) -> Any:
            rows, heads, _, dim = states.shape
            buffer = torch.empty((rows, heads, needed + CACHE_SLACK, dim), dtype=states.dtype, device=states.device)
            if old.numel():
                buffer[:, :, :old.shape[-2]] = old
            return buffer

    _GROWING_LAYER = GrowingLayer
    return GrowingLayer


def _layers(cache: Any) -> list[Any]:
    """The per-layer holders of ``keys``/``values`` tensors ([rows, kv heads, seq, head dim])."""
    return list(cache.layers)


GROUPED_SDPA = "grouped_sdpa_cpu"


def _grouped_sdpa_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' sdpa attention, except that with a mask the K/V heads stay grouped (``enable_gqa``).

    Why: with a padding mask transformers' ``sdpa_attention_forward`` repeats every K/V head for each
    query head (``repeat_kv``: on SmolLM2, three copies of the whole KV cache per layer per step),
    which on a CPU took about a fifth of a batched decoding step; torch's SDPA computes the same
    numbers from the grouped heads. Without a mask (one request alone) nothing changes.
    """
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1 or kwargs.get("output_attentions")
            or kwargs.get("head_mask") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model: Any) -> bool:
    """Switches an sdpa model to ``_grouped_sdpa_forward``; False (model untouched) where that is not
    possible: another attention implementation, or a transformers without these registries."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", GROUPED_SDPA):
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa_forward)
        AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
        model.set_attn_implementation(GROUPED_SDPA)
    except Exception as exc:  # noqa: BLE001 - an optimisation only
        log.info("backend.hf_grouped_sdpa_unavailable", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        return False
    return True
