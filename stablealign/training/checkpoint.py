"""Training checkpoints that resume without unpickling anything.

Why not ``accelerator.save_state`` / ``load_state``: they store the optimizer, the scheduler and the
RNG state with ``torch.save`` (pickle) and read them back with pickle, and a job's output directory
is a place that whoever can write the training volume can write too — a planted ``optimizer.bin``
would run code in the training pod on the next resume. So a checkpoint here holds only:

- ``model.safetensors``: the full model state (gathered from the FSDP shards on rank 0);
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's per-parameter tensors by parameter
  name, its param groups (hyper-parameters) as JSON;
- ``scheduler.json``: the LR scheduler's ``state_dict`` (numbers only);
- ``rng-rank<r>.json``: each process's Python, NumPy, torch (and CUDA) RNG state as numbers and base64.

Reading needs only ``safetensors`` and ``json``; nothing in a checkpoint can name code to run. The
state dicts go through ``torch.distributed.checkpoint.state_dict`` with full (unsharded) tensors,
so one code path serves a single process, DDP and FSDP2: rank 0 reads the files and broadcasts
them into the other ranks' shards, as it does with the base model. ``FORMAT`` in
``trainer_state.json`` marks a checkpoint written this way; any other (an older accelerate one with
pickles) is never opened.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

from stablealign.errors import ValidationError
from stablealign.logs import get_logger

log = get_logger(__name__)

FORMAT = "stablealign-checkpoint/2"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_GROUPS_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
_KEY_SEP = "::"  # optimizer tensor key: "<parameter name>::<state name>" (parameter names hold dots only)


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.json"


# --- RNG state as JSON -----------------------------------------------------------------------------


def _b64(tensor: Any) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _byte_tensor(text: str) -> Any:
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-ready values."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Sets this process's RNGs from ``rng_state()``'s output; ValidationError if it does not fit."""
    import numpy as np
    import torch

    try:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss)))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(_byte_tensor(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            saved = [_byte_tensor(s) for s in state["cuda"]]
            if len(saved) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(saved)
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise ValidationError(f"checkpoint RNG state is not readable: {type(exc).__name__}: {exc}") from None


# --- model, optimizer and scheduler ------------------------------------------------------------------


def _options(*, load: bool, distributed: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if load:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _unwrap_optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _save_tensors(tensors: dict[str, Any], path: Path) -> None:
    """safetensors refuses tensors that share memory (tied embeddings): those get their own copy."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and ident in seen:
            tensor = tensor.clone()
        seen.add(ident)
        out[key] = tensor
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp))
    tmp.replace(path)


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    tmp.replace(path)


def save_state(path: Path, model: Any, optimizer: Any, scheduler: Any, *, rank: int, main: bool,
               distributed: bool) -> None:
    """Writes the model, optimizer, scheduler and this rank's RNG into ``path`` (every rank calls this:
    gathering the shards is collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _options(load=False, distributed=distributed)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, _unwrap_optimizer(optimizer), options=options)
    path.mkdir(parents=True, exist_ok=True)
    if main:
        _save_tensors(model_state, path / MODEL_FILE)
        tensors, scalars = {}, {}
        for name, values in optim_state["state"].items():
            for key, value in values.items():
                if hasattr(value, "detach"):
                    tensors[f"{name}{_KEY_SEP}{key}"] = value
                else:
                    scalars.setdefault(name, {})[key] = value
        _save_tensors(tensors, path / OPTIMIZER_FILE)
        _write_json(path / OPTIMIZER_GROUPS_FILE, {"param_groups": optim_state["param_groups"], "scalars": scalars})
        _write_json(path / SCHEDULER_FILE, scheduler.state_dict())
    _write_json(path / rng_file(rank), rng_state())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValidationError(f"checkpoint file {path} is not readable: {exc}") from None


def _optimizer_state(path: Path) -> dict[str, Any]:
    """The full optimizer state dict (parameter names as keys) from its safetensors + JSON files."""
    import torch
    from safetensors.torch import load_file

    groups = _read_json(path / OPTIMIZER_GROUPS_FILE)
    if not isinstance(groups, dict) or not isinstance(groups.get("param_groups"), list):
        raise ValidationError(f"checkpoint file {path / OPTIMIZER_GROUPS_FILE}: no param_groups")
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(path / OPTIMIZER_FILE)).items():
        name, _, field = key.rpartition(_KEY_SEP)
        state.setdefault(name, {})[field] = tensor
    for name, values in (groups.get("scalars") or {}).items():
        state.setdefault(name, {}).update(values)
    param_groups = []
    for group in groups["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        param_groups.append(group)
    for values in state.values():  # torch keeps "step" as a float32 scalar tensor
        if "step" in values and not isinstance(values["step"], torch.Tensor):
            values["step"] = torch.tensor(float(values["step"]))
    return {"state": state, "param_groups": param_groups}


# What a LambdaLR's state holds besides its lambdas: numbers, nothing that names an object.
_SCHEDULER_KEYS = frozenset({"base_lrs", "last_epoch", "_step_count", "_is_initial", "_get_lr_called_within_step",
                             "_last_lr"})


def _scheduler_state(path: Path, scheduler: Any) -> dict[str, Any]:
    """The saved schedule position, only the known numeric fields (``load_state_dict`` copies whatever keys
    it gets onto the scheduler object); the lambdas stay the ones this run built."""
    saved = _read_json(path)
    if not isinstance(saved, dict):
        raise ValidationError(f"checkpoint file {path}: not a scheduler state")
    state = {k: v for k, v in saved.items() if k in _SCHEDULER_KEYS}
    for key, value in state.items():
        numbers = value if isinstance(value, list) else [value]
        if not all(isinstance(n, (int, float)) for n in numbers):
            raise ValidationError(f"checkpoint file {path}: {key} is not numeric")
    if "last_epoch" not in state:
        raise ValidationError(f"checkpoint file {path}: no last_epoch")
    state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    return state


def load_state(path: Path, model: Any, optimizer: Any, scheduler: Any, *, rank: int, main: bool,
               distributed: bool) -> None:
    """Restores what ``save_state`` wrote; with ``distributed``, rank 0 reads and broadcasts the tensors."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _options(load=True, distributed=distributed)
    reads = main or not distributed
    model_state = load_file(str(path / MODEL_FILE)) if reads else {}
    set_model_state_dict(model, model_state, options=options)
    optim_state = _optimizer_state(path) if reads else {}
    set_optimizer_state_dict(model, _unwrap_optimizer(optimizer), optim_state, options=options)
    scheduler.load_state_dict(_scheduler_state(path / SCHEDULER_FILE, scheduler))
    rng = path / rng_file(rank)
    if rng.is_file():
        restore_rng(_read_json(rng))
    else:  # fewer processes than now: this rank keeps its seeded RNG
        log.warning("train.resume_rng_missing", extra={"rank": rank, "path": str(rng)})
