"""Stable Alignment training on ``accelerate``: one process on CPU, or ``torchrun`` + FSDP on GPUs.

Why a plain loop rather than ``transformers.Trainer`` (the original's choice): the loss needs all
responses of a group in one forward pass and a per-group reduction, which the Trainer's
``compute_loss`` hook forced into batch size 1; and exact resumption needs a data order we control.

- Data order is stateless: epoch e visits the groups in ``randperm(n, seed + e)``; optimizer step s
  consumes micro-batches ``s * grad_accum ...`` of its epoch, rank r taking its slice of each. So
  the position in the data is a function of the step alone, and a job killed after checkpoint k
  resumes at step k + 1 with the same batches, the same sampled responses (the collator seeds per
  group) and — with model, optimizer, scheduler and RNG restored from the checkpoint — the same
  parameters and losses as an unbroken run.
- A checkpoint is complete once its ``trainer_state.json`` exists (written last, atomically); on
  resume ``train_log.jsonl`` is cut back to the checkpoint's step so no line is duplicated.
- A checkpoint is safetensors and JSON only, never pickle (``stablealign.training.checkpoint``):
  an output directory is writable by more than the trainer, and resuming must not run code from it.
- FSDP wraps the model's decoder-layer class found from the model itself (``_no_split_modules`` or
  the class repeated in its ``ModuleList`` of layers), not a hard-coded ``LlamaDecoderLayer``.
- With FSDP only rank 0 reads the base model (``fsdp_rank0_loading``): the other ranks build its
  skeleton on the meta device from ``config.json`` and receive the weights from rank 0 as FSDP shards
  them. FSDP1 spelled this ``sync_module_states=True`` + a ``param_init_fn``; the trainer runs FSDP2,
  where accelerate's ``cpu_ram_efficient_loading`` broadcasts rank 0's full state dict into each
  rank's shards. A node then holds one host copy of the model at start-up, not one per GPU
  (8 x 27 GB for LLaMA-7B in float32 before), and the other ranks never open a weights file.
- bf16 autocast where the device multiplies bf16 natively: CUDA with bf16, or a CPU with AVX512-BF16/AMX
  outside FSDP (weights, gradients and the optimizer stay float32); fp32 elsewhere, where bf16 is emulated
  and slower than fp32.

``python -m stablealign.training.train --model ... --data ... --out ...`` is the torchrun entry point;
``stable-align train`` is the same command.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from stablealign.core.config import LaunchSettings, ProcessSettings, TrainingProcessSettings, load_settings
from stablealign.core.errors import ValidationError
from stablealign.core.logs import get_logger
from stablealign.core.timing import timed
from stablealign.training import checkpoint as ckpt
from stablealign.training.config import StableAlignmentConfig

log = get_logger(__name__)

LOG_FILE = "train_log.jsonl"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "stable_alignment_config.json"
CHECKPOINTS = "checkpoints"



@dataclass(frozen=True)
class TrainerMetrics:
    loss: Gauge
    sft: Gauge
    penalty: Gauge
    tokens_per_second: Gauge
    step_seconds: Histogram
    steps: Counter


@functools.lru_cache(maxsize=1)
def trainer_metrics() -> TrainerMetrics:
    """Created on first use, not at import: ``python -m stablealign.training.train`` imports this file twice
    (as ``__main__`` and as ``stablealign.training.train``) and a metric may be registered only once."""
    return TrainerMetrics(
        loss=Gauge("stablealign_trainer_loss", "Stable Alignment loss of the last optimizer step."),
        sft=Gauge("stablealign_trainer_loss_sft", "SFT part (cross-entropy of the best response) of the last step."),
        penalty=Gauge("stablealign_trainer_loss_penalty", "Ranking penalty part of the last step."),
        tokens_per_second=Gauge("stablealign_trainer_tokens_per_second",
                                "Tokens (prompt + response, all processes) per second in the last step."),
        step_seconds=Histogram("stablealign_trainer_step_duration_seconds", "Wall time of one optimizer step.",
                               buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)),
        steps=Counter("stablealign_trainer_steps_total", "Optimizer steps done."),
    )


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    total_steps: int
    final_loss: float | None
    resumed_from: int
    stopped_early: bool = False


# --- model inspection ---------------------------------------------------------------------------


def decoder_layer_classes(model: Any) -> list[str]:
    """Names of the classes FSDP should wrap: the model's repeated transformer block."""
    import torch

    present = {type(m).__name__ for m in model.modules()}
    declared = [name for name in (getattr(model, "_no_split_modules", None) or []) if name in present]
    if declared:
        return sorted(set(declared))
    best: tuple[int, str] | None = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            kinds = {type(child).__name__ for child in module}
            if len(kinds) == 1 and any(p.numel() for p in module[0].parameters()):
                size = sum(p.numel() for p in module.parameters())
                if best is None or size > best[0]:
                    best = (size, kinds.pop())
    if best is None:
        raise ValidationError(f"cannot find the decoder layers of {type(model).__name__} to wrap with FSDP")
    return [best[1]]


def fsdp_active(cfg: StableAlignmentConfig) -> bool:
    """Whether this run shards with FSDP: asked for, several processes, and a device FSDP runs on here
    (CUDA, or the CPU with gloo unless ``STABLEALIGN_FSDP_CPU=false`` asks for DDP there)."""
    import torch

    distributed = load_settings(LaunchSettings).world_size > 1
    on_device = torch.cuda.is_available() or load_settings(TrainingProcessSettings).fsdp_cpu
    return bool(cfg.fsdp) and distributed and on_device


def load_base_model(model_dir: Path, *, empty: bool) -> Any:
    """The base model in float32, read from ``model_dir`` — or, with ``empty``, only its skeleton.

    The skeleton is built from ``config.json`` alone, without opening a weights file: parameters on
    the meta device (no memory), buffers real (rotary frequencies and other non-persistent buffers
    are not in the checkpoint, so FSDP's broadcast could not fill them). FSDP then receives the
    weights from rank 0 (see the module docstring). The ``train.model_loaded`` log line says which
    way each rank went.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if empty:
        from accelerate import init_empty_weights

        config = AutoConfig.from_pretrained(model_dir)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    log.info("train.model_loaded", extra={"rank": load_settings(LaunchSettings).rank, "path": str(model_dir),
                                          "source": "meta" if empty else "checkpoint"})
    return model


def mixed_precision(bf16: bool, *, fsdp: bool = False) -> str:
    """accelerate's ``mixed_precision`` for a run asking for bf16: "bf16" where the device computes it
    natively, "no" where bf16 would be emulated. On CPU, FSDP stays float32: its sharded mixed-precision
    path is CUDA's."""
    import torch

    from stablealign.llm.backends.batching import bf16_native_on

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16" if bf16 and bf16_native_on(kind) and not (fsdp and kind == "cpu") else "no"


def check_model_path(path: str) -> Path:
    """The model directory for a path or a known model's name (``stable-align model pull``)."""
    from stablealign.core.errors import ConfigError
    from stablealign.llm.models import resolve_model_path

    try:
        model = resolve_model_path(path)
    except ConfigError as exc:
        raise ValidationError(str(exc)) from None
    if not model.is_dir():
        raise ValidationError(f"model path does not exist or is not a directory: {path}")
    if not (model / "config.json").is_file():
        raise ValidationError(f"not a model directory (no config.json): {path}")
    return model


# --- data plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPlan:
    """Which groups each rank sees at each optimizer step (a pure function of the step)."""

    n_groups: int
    batch_size: int
    world: int
    grad_accum: int
    seed: int
    # Lengths of the groups (characters): when given, each block of ``MEGA_BATCHES`` micro-batches of
    # the shuffled order is sorted longest first, so a micro-batch holds groups of similar length and
    # the one padded forward pass wastes little on padding (HF's group_by_length idea).
    lengths: tuple[int, ...] | None = None

    MEGA_BATCHES = 64

    @property
    def micro_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_groups / (self.batch_size * self.world)))

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.micro_per_epoch // self.grad_accum)

    def permutation(self, epoch: int) -> list[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n_groups, generator=generator).tolist()
        if self.lengths is None:
            return perm
        block = self.MEGA_BATCHES * self.batch_size * self.world
        lengths = self.lengths
        return [i for s in range(0, len(perm), block)
                for i in sorted(perm[s: s + block], key=lambda i: -lengths[i])]

    def micro_batch(self, perm: list[int], micro: int, rank: int) -> list[int]:
        """Group indices of micro-batch ``micro`` (within the epoch) for ``rank``; wraps at the end."""
        start = (micro * self.world + rank) * self.batch_size
        return [perm[(start + k) % self.n_groups] for k in range(self.batch_size)]

    def step_batches(self, step: int, rank: int) -> tuple[int, list[list[int]]]:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        return epoch, [self.micro_batch(perm, in_epoch * self.grad_accum + j, rank) for j in range(self.grad_accum)]


def group_length(group: Any) -> int:
    """Cheap length proxy of a group in one padded batch: prompt + its longest response (characters)."""
    return len(group.query) + max(len(r) for r in group.responses)


# --- checkpoints ----------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-")[1])
    except (IndexError, ValueError):
        return -1


def _resumable(path: Path) -> bool:
    """A complete checkpoint in this trainer's format: its trainer_state.json parses and names ``ckpt.FORMAT``.

    Anything else (an accelerate checkpoint with pickled state, a half-written or planted folder) is
    skipped with a log line and never opened further.
    """
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    ok = isinstance(state, dict) and state.get("format") == ckpt.FORMAT and isinstance(state.get("step"), int)
    if not ok:
        log.warning("train.checkpoint_ignored", extra={"path": str(path),
                                                       "reason": f"not a {ckpt.FORMAT} checkpoint (never unpickled)"})
    return ok


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete, resumable checkpoint with the highest step (see ``_resumable``)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted((p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and _checkpoint_step(p) >= 0),
                  key=_checkpoint_step, reverse=True)
    return next((p for p in done if _resumable(p)), None)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _truncate_log(path: Path, step: int) -> None:
    """Drops log lines after ``step`` (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# --- the loop -------------------------------------------------------------------------------------


def _scheduler(cfg: StableAlignmentConfig, optimizer: Any, total_steps: int) -> Any:
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if cfg.lr_scheduler_type == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)


def _accelerator(cfg: StableAlignmentConfig, layer_classes: list[str], *, rank0_loading: bool = False) -> Any:
    """The accelerate ``Accelerator`` of a run; ``rank0_loading``: rank 0 alone holds the base weights and
    FSDP broadcasts them into the other ranks' shards (``cpu_ram_efficient_loading``)."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState

    distributed = load_settings(LaunchSettings).world_size > 1
    plugin = None
    if cfg.fsdp and distributed:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=cfg.fsdp == "full_shard",  # shard_grad_op: keep params after forward
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=layer_classes,
            state_dict_type="SHARDED_STATE_DICT",  # checkpoints: each rank writes its shard
            # FSDP2's sync_module_states: rank 0's weights, broadcast while sharding (else every rank
            # read the same weights from disk itself).
            cpu_ram_efficient_loading=rank0_loading,
            activation_checkpointing=False,  # done through the model (gradient_checkpointing)
        )
    elif cfg.fsdp:
        log.info("train.fsdp_skipped", extra={"reason": "single process"})
    import torch

    cpu = not torch.cuda.is_available()  # accelerate only starts a gloo process group when told "cpu"
    PartialState(cpu=cpu)  # initialises the process group (gloo on CPU, nccl on CUDA) before the plugin
    precision = mixed_precision(cfg.bf16, fsdp=plugin is not None)
    if not distributed:
        # accelerate keeps one precision per process; a process that trains again (the trainer's
        # in-process jobs, the tests), maybe with another one, starts its accelerator state afresh.
        AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=precision, fsdp_plugin=plugin)
    if plugin is not None and cpu and load_settings(TrainingProcessSettings).fsdp_cpu:
        # accelerate only turns the FSDP plugin on for accelerator devices (MULTI_CPU silently becomes
        # DDP); torch's FSDP itself runs on CPU with gloo, so switch the state over by hand.
        from accelerate.utils import DistributedType

        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP  # the two states share this field
        accelerator.state.fsdp_plugin = plugin
    return accelerator


@dataclass
class _Run:
    """What the steps of one training run share: the config, its data, and the prepared model."""

    cfg: StableAlignmentConfig
    out: Path
    groups: list[Any]
    tokenizer: Any
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    collator: Any
    plan: DataPlan
    total_steps: int

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass(frozen=True)
class _StepResult:
    """One optimizer step, averaged over its micro-batches and processes."""

    epoch: int
    loss: float
    sft: float
    penalty: float
    lr: float  # the learning rate the step used
    seconds: float
    tokens_per_second: float


def _prepare(cfg: StableAlignmentConfig, model_dir: Path, groups: list[Any]) -> _Run:
    """Tokenizer, model, accelerator, data plan and optimizer of a run; the config saved beside its output."""
    import torch
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from stablealign.training.collator import AlignmentCollator

    out = Path(cfg.output_dir)
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:  # pads are never attended nor learned: EOS is a safe stand-in
        tokenizer.pad_token = tokenizer.eos_token
    # Rank 0 reads the weights; with FSDP the others get them from it (module docstring).
    rank0_loading = cfg.fsdp_rank0_loading and fsdp_active(cfg)
    model = load_base_model(model_dir, empty=rank0_loading and load_settings(LaunchSettings).rank != 0)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    accelerator = _accelerator(cfg, decoder_layer_classes(model), rank0_loading=rank0_loading)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_FILE)

    plan = DataPlan(len(groups), cfg.per_device_train_batch_size, accelerator.num_processes,
                    cfg.gradient_accumulation_steps, cfg.seed,
                    lengths=tuple(group_length(g) for g in groups) if cfg.group_by_length else None)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * plan.steps_per_epoch))
    collator = AlignmentCollator(tokenizer, max_length=cfg.max_length, num_comp=cfg.num_comp, seed=cfg.seed)

    model.train()
    # FSDP2 (accelerate): model and optimizer prepared together; the optimizer's params are swapped
    # for the sharded ones.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = _scheduler(cfg, optimizer, total_steps)  # stepped by us once per optimizer step
    return _Run(cfg, out, groups, tokenizer, accelerator, model, optimizer, scheduler, collator, plan, total_steps)


def _resume(run: _Run) -> int:
    """The step to start from: the last checkpoint's (its weights, optimizer and scheduler loaded), else 0."""
    cfg, accelerator, start_step = run.cfg, run.accelerator, 0
    checkpoint = last_checkpoint(run.out) if cfg.resume else None
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        if state.get("world_size") != accelerator.num_processes:
            log.warning("train.resume_world_changed", extra={"was": state.get("world_size"),
                                                              "now": accelerator.num_processes})
        ckpt.load_state(checkpoint, accelerator.unwrap_model(run.model), run.optimizer, run.scheduler,
                        rank=accelerator.process_index, main=run.main, distributed=accelerator.num_processes > 1)
        start_step = int(state["step"])
        log.info("train.resumed", extra={"checkpoint": str(checkpoint), "step": start_step})
    if run.main:
        # Lines logged after the step we start from came from a run that was killed before its next
        # checkpoint (or before any): they are about to be logged again.
        _truncate_log(run.out / LOG_FILE, start_step)
    return start_step


def _announce(run: _Run, start_step: int) -> None:
    """The /metrics server (main process, when asked) and the ``train.start`` line."""
    cfg, accelerator = run.cfg, run.accelerator
    trainer_metrics()  # registered before the first step: /metrics lists them from the start
    if cfg.metrics_port >= 0 and run.main:
        from stablealign.core.metrics import start_metrics_server

        # In a pod the port must be reachable by Prometheus: the same bind setting as the services.
        port = start_metrics_server(cfg.metrics_port, load_settings(ProcessSettings).metrics_host)
        log.info("train.metrics", extra={"port": port})
    log.info("train.start", extra={"groups": len(run.groups), "total_steps": run.total_steps,
                                   "start_step": start_step, "processes": accelerator.num_processes,
                                   "precision": accelerator.mixed_precision, "fsdp": cfg.fsdp or "none",
                                   "distributed": str(accelerator.distributed_type),
                                   "wrapper": type(run.model).__name__})


def _train_step(run: _Run, step: int, keep_window: bool) -> _StepResult:
    """One optimizer step (``step`` counted from 0): its micro-batches forward and backward, the optimizer
    and scheduler stepped, the loss parts averaged over micro-batches and processes."""
    import torch

    from stablealign.training.loss import batch_response_losses, stable_alignment_loss_parts

    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    took: dict[str, float] = {}
    with timed(took, "step"):
        epoch, micro_batches = run.plan.step_batches(step, accelerator.process_index)
        run.collator.epoch = epoch
        sums = torch.zeros(4, device=accelerator.device, dtype=torch.float64)  # loss, sft, penalty, tokens
        for indices in micro_batches:
            batch = run.collator([(i, run.groups[i]) for i in indices])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                response_losses = batch_response_losses(model, batch, logits_to_keep=keep_window)
                parts = stable_alignment_loss_parts(
                    response_losses, batch["scores"], batch["mask"], margin=cfg.margin, ratio=cfg.ratio,
                    rating_scale=cfg.rating_scale, max_flow=cfg.max_flow)
                accelerator.backward(parts.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([parts.loss.detach().double(), parts.sft.detach().double(),
                                 parts.penalty.detach().double(),
                                 batch["attention_mask"].sum().double()])
        lr_used = run.scheduler.get_last_lr()[0]
        run.scheduler.step()
        totals = accelerator.reduce(sums, reduction="sum")
        n_micro = len(micro_batches) * accelerator.num_processes
        loss, sft, penalty = (float(totals[i] / n_micro) for i in range(3))
    seconds = took["step"]
    return _StepResult(epoch, loss, sft, penalty, lr_used, seconds, float(totals[3]) / max(seconds, 1e-9))


def _report(run: _Run, step: int, result: _StepResult, *, job_rows: bool, show_bar: bool) -> None:
    """The step's metrics, and every ``logging_steps`` its row: in the run's log file, and as a job's
    stdout line, or a log line where no bar shows progress (main process only)."""
    metrics = trainer_metrics()
    metrics.loss.set(result.loss)
    metrics.sft.set(result.sft)
    metrics.penalty.set(result.penalty)
    metrics.tokens_per_second.set(result.tokens_per_second)
    metrics.step_seconds.observe(result.seconds)
    metrics.steps.inc()
    if step % run.cfg.logging_steps != 0 and step != run.total_steps:
        return
    row = {"step": step, "epoch": round(step / run.plan.steps_per_epoch, 4),
           "loss": result.loss, "loss/sft": result.sft, "loss/penalty": result.penalty,
           "lr": result.lr, "tokens_per_second": round(result.tokens_per_second, 2),
           "step_seconds": round(result.seconds, 4), "truncated_examples": run.collator.truncated}
    with open(run.out / LOG_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    if job_rows:
        # A job's log stream carries the same row as one newline-terminated line: a progress bar only
        # redraws with carriage returns, which a pod log does not deliver until the line ends.
        print(json.dumps(row), flush=True)
    elif not show_bar:
        log.info("train.step", extra=row)


def train(cfg: StableAlignmentConfig, *, stop_after_steps: int | None = None) -> TrainResult:
    """Runs (or resumes) a training job; returns where the final model is and the last loss.

    ``stop_after_steps`` simulates a preemption for tests: the process stops right after that many
    steps of *this* run, without a final checkpoint or model, as if it had been killed.
    """
    model_dir = check_model_path(cfg.model)
    from stablealign.training.data import load_alignment_groups

    groups = load_alignment_groups(cfg.data, max_chars=cfg.dataloader_max_chars, rating_scale=cfg.rating_scale)

    from tqdm.auto import tqdm

    from stablealign.training.loss import model_takes_logits_to_keep

    run = _prepare(cfg, model_dir, groups)
    accelerator, out, total_steps = run.accelerator, run.out, run.total_steps
    start_step = _resume(run)
    _announce(run, start_step)
    # A person gets a bar on a terminal (log lines print above it), else one log line per logged step.
    # A trainer job (local runner or Kubernetes pod: STABLEALIGN_JOB_ID is set) prints each logged
    # step as one JSON line on stdout instead: the runner reads those lines as the job's metrics.
    show_bar = run.main and sys.stderr.isatty()
    job_rows = bool(load_settings(TrainingProcessSettings).job_id)
    progress = tqdm(total=total_steps, initial=start_step, disable=not show_bar, desc="stable-align train",
                    dynamic_ncols=True)
    last_loss: float | None = None
    step = start_step
    keep_window = model_takes_logits_to_keep(accelerator.unwrap_model(run.model))
    while step < total_steps:
        result = _train_step(run, step, keep_window)
        step += 1
        last_loss = result.loss
        if run.main:
            _report(run, step, result, job_rows=job_rows, show_bar=show_bar)
            progress.update(1)
            progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens_per_second:.0f}")
        if stop_after_steps is not None and step - start_step >= stop_after_steps and step < total_steps:
            progress.close()
            log.warning("train.stopped", extra={"step": step, "reason": "stop_after_steps (simulated preemption)"})
            accelerator.wait_for_everyone()
            return TrainResult(out, step, total_steps, last_loss, start_step, stopped_early=True)
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == total_steps:
            _save_checkpoint(accelerator, cfg, out, step, result.epoch, total_steps, run.plan,
                             (run.model, run.optimizer, run.scheduler))
    progress.close()
    if run.collator.truncated and run.main:
        log.warning("train.truncated", extra={"examples": run.collator.truncated, "max_length": cfg.max_length})
    _save_final(accelerator, run.model, run.tokenizer, out, cfg)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out, step, total_steps, last_loss, start_step)


def _save_checkpoint(accelerator: Any, cfg: StableAlignmentConfig, out: Path, step: int, epoch: int,
                     total_steps: int, plan: DataPlan, parts: tuple[Any, Any, Any]) -> None:
    path = out / CHECKPOINTS / f"step-{step:08d}"
    model, optimizer, scheduler = parts
    accelerator.wait_for_everyone()
    layout = ckpt.save_state(path, accelerator.unwrap_model(model), optimizer, scheduler,
                             rank=accelerator.process_index, main=accelerator.is_main_process,
                             distributed=accelerator.num_processes > 1)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomic(path / STATE_FILE, {
            "format": ckpt.FORMAT, "layout": layout, "step": step, "epoch": epoch, "total_steps": total_steps, "seed": cfg.seed,
            "world_size": accelerator.num_processes, "steps_per_epoch": plan.steps_per_epoch,
            # position in the data: the next step starts at this micro-batch of its epoch
            "sampler": {"epoch": step // plan.steps_per_epoch,
                        "micro_batch": (step % plan.steps_per_epoch) * plan.grad_accum},
            "rng": [ckpt.rng_file(r) for r in range(accelerator.num_processes)], "time": time.time(),
        })
        if cfg.save_total_limit:
            done = sorted((p for p in (out / CHECKPOINTS).glob("step-*") if (p / STATE_FILE).is_file()),
                          key=lambda p: int(p.name.split("-")[1]))
            for old in done[: -cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    log.info("train.checkpoint", extra={"step": step, "path": str(path)})


def _save_final(accelerator: Any, model: Any, tokenizer: Any, out: Path, cfg: StableAlignmentConfig) -> None:
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # FSDP: gathered to the main process
    unwrapped = accelerator.unwrap_model(model)
    if cfg.gradient_checkpointing:
        unwrapped.config.use_cache = True
    unwrapped.save_pretrained(out, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                              state_dict=state_dict, safe_serialization=True)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(out)
        log.info("train.saved", extra={"path": str(out)})


# --- command line ---------------------------------------------------------------------------------


if __name__ == "__main__":
    # ``python -m stablealign.training.train`` (the torchrun entry; ``stablealign.training.cli.main``). Run so,
    # this file is the module ``__main__``; the command imports ``stablealign.training.train`` as a module
    # of its own, so the library has no import circle (tests/unit/test_import_cycles.py).
    from stablealign.training.cli import main

    main()
