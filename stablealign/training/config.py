"""``StableAlignmentConfig``: every knob of a Stable Alignment run, TRL style.

One dataclass, every field with ``metadata={"help": ...}`` (the CLI, the trainer service's JobSpec
``args`` and the docs read the same help), checked in ``__post_init__`` so that a bad value fails
before a model is loaded. Defaults are the original recipe (DESIGN §1: lr 2e-5, 7 epochs, batch
1 × grad-accum 8, max length 360, cosine with 3 % warmup, bf16, margin 10, ratio 0.2, rating scale
7, 3 responses per group), plus what the original lacked (seed, checkpoint/resume, FSDP choice
without hard-coded layer classes). Why not subclass ``transformers.TrainingArguments``: our loop
is plain ``accelerate`` and most of those ~150 fields would be silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stablealign.core.errors import ConfigError

FSDP_MODES = ("", "full_shard", "shard_grad_op")
LR_SCHEDULERS = ("cosine", "constant")


def _help(text: str, default: Any, choices: tuple[str, ...] = ()) -> Any:
    """A field with its help (and, for a string with a fixed set of values, ``choices``) in its metadata."""
    metadata: dict[str, Any] = {"help": text}
    if choices:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass
class StableAlignmentConfig:
    """A Stable Alignment training run."""

    model: str = _help("Base model: a directory with config, weights and tokenizer (save_pretrained), or a known "
                       "model's name (smollm2-135m-instruct, after `stable-align model pull`).", "")
    data: str = _help("Alignment groups (JSONL of {query, responses, scores}, or the original's JSON array).", "")
    output_dir: str = _help("Where checkpoints, train_log.jsonl and the final model go.", "runs/train")
    learning_rate: float = _help("Peak learning rate (AdamW).", 2e-5)
    weight_decay: float = _help("AdamW weight decay (the original: 0).", 0.0)
    num_train_epochs: float = _help("Passes over the data (ignored when max_steps > 0).", 7.0)
    per_device_train_batch_size: int = _help("Groups per device per micro-batch (the original had to use 1).", 1)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", 8)
    max_length: int = _help("Tokens of prompt + response; longer examples are cut (counted in the log).", 360)
    lr_scheduler_type: str = _help("Learning-rate schedule: cosine (with warmup) or constant.", "cosine",
                                   LR_SCHEDULERS)
    warmup_ratio: float = _help("Fraction of the steps with a linear warm-up.", 0.03)
    max_grad_norm: float = _help("Gradient clipping norm (0: none).", 1.0)
    bf16: bool = _help("bf16 mixed precision where the device computes bf16 natively (CUDA, AVX512-BF16/AMX CPUs); "
                       "fp32 elsewhere.", True)
    margin: float = _help("Margin constant of the ranking penalty.", 10.0)
    ratio: float = _help("Weight of the ranking penalty.", 0.2)
    rating_scale: float = _help("Span of the ratings (7 for 1-7).", 7.0)
    num_comp: int = _help("Responses sampled per group and step (the best is always kept).", 3)
    max_flow: bool = _help("Penalty = max over the worse responses instead of their mean.", False)
    group_by_length: bool = _help("Batch groups of similar length together (less padding in the one forward).",
                                  True)
    seed: int = _help("Seed of initialisation-free randomness: data order and response sampling.", 42)
    gradient_checkpointing: bool = _help("Recompute activations in backward (less memory, more compute per step).", False)
    fsdp: str = _help("FSDP sharding: '' (none: DDP when distributed), 'full_shard' or 'shard_grad_op'.", "",
                      FSDP_MODES)
    fsdp_rank0_loading: bool = _help(
        "FSDP: only rank 0 reads the base model; the other ranks build it on the meta device and receive the "
        "weights from rank 0 when it is sharded (host memory for one copy instead of one per GPU). Off: every "
        "rank reads the checkpoint.", True)
    save_steps: int = _help("Checkpoint every N optimizer steps (0: only at the end).", 200)
    save_total_limit: int = _help("Checkpoints kept (oldest removed first; 0: keep all).", 2)
    logging_steps: int = _help("Write a train_log.jsonl line every N optimizer steps.", 1)
    max_steps: int = _help("Stop after N optimizer steps (-1: run num_train_epochs).", -1)
    resume: bool = _help("Resume from the last complete checkpoint in output_dir, if any.", True)
    metrics_port: int = _help("Prometheus /metrics port on the main process (-1: none, 0: a free port).", -1)
    dataloader_max_chars: int = _help("Texts longer than this many characters are cut when loading.", 20000)

    def __post_init__(self) -> None:
        checks = [
            (self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.num_train_epochs > 0 or self.max_steps > 0, "num_train_epochs must be > 0 (or set max_steps)"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.max_length >= 8, "max_length must be >= 8"),
            (self.lr_scheduler_type in LR_SCHEDULERS, "lr_scheduler_type must be cosine or constant"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
            (self.margin >= 0, "margin must be >= 0"),
            (self.ratio >= 0, "ratio must be >= 0"),
            (self.rating_scale > 0, "rating_scale must be > 0"),
            (self.num_comp >= 1, "num_comp must be >= 1"),
            (self.fsdp in FSDP_MODES, f"fsdp must be one of {FSDP_MODES}"),
            (self.save_steps >= 0, "save_steps must be >= 0"),
            (self.save_total_limit >= 0, "save_total_limit must be >= 0"),
            (self.logging_steps >= 1, "logging_steps must be >= 1"),
            (self.max_steps == -1 or self.max_steps >= 1, "max_steps must be -1 or >= 1"),
            (self.dataloader_max_chars >= 16, "dataloader_max_chars must be >= 16"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def replace(self, **changes: Any) -> StableAlignmentConfig:
        return dataclasses.replace(self, **changes)
