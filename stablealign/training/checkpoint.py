"""Training checkpoints that resume without unpickling anything.

Why not ``accelerator.save_state`` / ``load_state``: they store the optimizer, the scheduler and the
RNG state with ``torch.save`` (pickle) and read them back with pickle, and a job's output directory
is a place that whoever can write the training volume can write too — a planted ``optimizer.bin``
would run code in the training pod on the next resume. So a checkpoint here holds only:

- ``model.safetensors`` + ``optimizer.safetensors`` (one process, or DDP: the ``full`` layout), or
  under FSDP ``model-rank<r>.safetensors`` + ``optimizer-rank<r>.safetensors``, each rank's own
  shards (the ``sharded`` layout: no rank ever gathers the whole model and its Adam moments in host
  memory, which for a 7B model would be three model copies on rank 0);
- ``optimizer.json``: the optimizer's param groups (hyper-parameters); its per-parameter tensors are
  in the safetensors files above, keyed ``<parameter name>::<state name>``;
- ``scheduler.json``: the LR scheduler's position (numbers only);
- ``rng-rank<r>.json``: each process's Python, NumPy, torch (and CUDA) RNG state as numbers and base64.

Reading needs only ``safetensors`` and ``json``; nothing in a checkpoint can name code to run. The
state dicts go through ``torch.distributed.checkpoint.state_dict``. A sharded checkpoint resumes
only with the same number of processes (each rank's part must fit its shard; anything else is a
ValidationError, never a guess). ``FORMAT`` in ``trainer_state.json`` marks a checkpoint written
this way; any other (an older accelerate one with pickles) is never opened.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

from stablealign.core.errors import ValidationError
from stablealign.core.logs import get_logger

log = get_logger(__name__)

FORMAT = "stablealign-checkpoint/2"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_GROUPS_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
_KEY_SEP = "::"  # optimizer tensor key: "<parameter name>::<state name>" (parameter names hold dots only)


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.json"


def model_rank_file(rank: int) -> str:
    return f"model-rank{rank:05d}.safetensors"


def optimizer_rank_file(rank: int) -> str:
    return f"optimizer-rank{rank:05d}.safetensors"


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


def _flatten_optimizer(optim_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(tensors by "<param>::<field>", non-tensor per-parameter values) of an optimizer state dict."""
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in optim_state["state"].items():
        for key, value in values.items():
            if hasattr(value, "detach"):
                tensors[f"{name}{_KEY_SEP}{key}"] = _local(value)
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, scalars


def _local(tensor: Any) -> Any:
    """This rank's part of a sharded (DTensor) value; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def sharded(model: Any, distributed: bool) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors): then each rank writes and reads its own part
    (no rank ever holds the whole model and optimizer state in host memory)."""
    from torch.distributed.tensor import DTensor

    return distributed and any(isinstance(p, DTensor) for p in model.parameters())


def save_state(path: Path, model: Any, optimizer: Any, scheduler: Any, *, rank: int, main: bool,
               distributed: bool) -> str:
    """Writes the model, optimizer, scheduler and this rank's RNG into ``path``; every rank calls this
    (gathering or listing the shards is collective). Returns the layout: ``full`` (one model file, written
    by rank 0) or ``sharded`` (one model and optimizer file per rank, FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    layout = "sharded" if sharded(model, distributed) else "full"
    options = StateDictOptions() if layout == "sharded" else StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, _unwrap_optimizer(optimizer), options=options)
    path.mkdir(parents=True, exist_ok=True)
    tensors, scalars = _flatten_optimizer(optim_state) if (main or layout == "sharded") else ({}, {})
    if layout == "sharded":
        _save_tensors({k: _local(v) for k, v in model_state.items()}, path / model_rank_file(rank))
        _save_tensors(tensors, path / optimizer_rank_file(rank))
    elif main:
        _save_tensors(model_state, path / MODEL_FILE)
        _save_tensors(tensors, path / OPTIMIZER_FILE)
    if main:
        _write_json(path / OPTIMIZER_GROUPS_FILE, {"param_groups": optim_state["param_groups"], "scalars": scalars})
        _write_json(path / SCHEDULER_FILE, scheduler.state_dict())
    _write_json(path / rng_file(rank), rng_state())
    return layout


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValidationError(f"checkpoint file {path} is not readable: {exc}") from None


def _optimizer_state(path: Path, tensor_file: str = OPTIMIZER_FILE) -> dict[str, Any]:
    """The optimizer state dict (parameter names as keys) from its safetensors + JSON files."""
    import torch
    from safetensors.torch import load_file

    groups = _read_json(path / OPTIMIZER_GROUPS_FILE)
    if not isinstance(groups, dict) or not isinstance(groups.get("param_groups"), list):
        raise ValidationError(f"checkpoint file {path / OPTIMIZER_GROUPS_FILE}: no param_groups")
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(path / tensor_file)).items():
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


def _like(current: Any, saved: Any, what: str) -> Any:
    """``saved`` (this rank's part, from the file) in the form of ``current``: a DTensor with the same mesh,
    placements and global shape, or a plain tensor on its device; ValidationError if the part does not fit."""
    from torch.distributed.tensor import DTensor

    local = current.to_local() if isinstance(current, DTensor) else current
    if tuple(saved.shape) != tuple(local.shape):
        raise ValidationError(f"checkpoint {what}: shape {tuple(saved.shape)} does not fit {tuple(local.shape)} "
                              "(resume with the same number of processes as the run that wrote it)")
    saved = saved.to(device=local.device, dtype=local.dtype)
    if isinstance(current, DTensor):
        return DTensor.from_local(saved, current.device_mesh, current.placements, run_check=False,
                                  shape=current.shape, stride=current.stride())
    return saved


def _load_sharded(path: Path, model: Any, optimizer: Any, rank: int) -> None:
    """Each rank's own parts back into its shards (the layout ``save_state`` wrote under FSDP)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    files = (path / model_rank_file(rank), path / optimizer_rank_file(rank))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValidationError(f"checkpoint {path} has no {', '.join(missing)}: it was written with another number "
                              "of processes or without FSDP; resume it the same way")
    current = get_model_state_dict(model)
    saved = load_file(str(files[0]))
    if set(saved) != set(current):
        raise ValidationError(f"checkpoint {files[0]}: its tensors are not this model's")
    set_model_state_dict(model, {k: _like(v, saved[k], k) for k, v in current.items()})
    optim = _unwrap_optimizer(optimizer)
    template = get_optimizer_state_dict(model, optim)  # creates the state to fill (shapes, shards)
    state = _optimizer_state(path, optimizer_rank_file(rank))
    for name, values in state["state"].items():
        for field, value in values.items():
            now = template["state"].get(name, {}).get(field)
            if now is None:
                raise ValidationError(f"checkpoint {files[1]}: {name}{_KEY_SEP}{field} is not in this optimizer")
            if hasattr(value, "detach") and hasattr(now, "detach"):
                values[field] = _like(now, value, f"{name}{_KEY_SEP}{field}")
    set_optimizer_state_dict(model, optim, state)


def load_state(path: Path, model: Any, optimizer: Any, scheduler: Any, *, rank: int, main: bool,
               distributed: bool) -> None:
    """Restores what ``save_state`` wrote: this rank's own parts under FSDP, else rank 0 reads the full state
    (and, with ``distributed``, broadcasts it)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if sharded(model, distributed):
        _load_sharded(path, model, optimizer, rank)
    else:
        if not (path / MODEL_FILE).is_file():
            raise ValidationError(f"checkpoint {path} has no {MODEL_FILE}: it was written by sharded (FSDP) "
                                  "processes; resume it the same way")
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=True)
        reads = main or not distributed
        set_model_state_dict(model, load_file(str(path / MODEL_FILE)) if reads else {}, options=options)
        set_optimizer_state_dict(model, _unwrap_optimizer(optimizer), _optimizer_state(path) if reads else {},
                                 options=options)
    scheduler.load_state_dict(_scheduler_state(path / SCHEDULER_FILE, scheduler))
    rng = path / rng_file(rank)
    if rng.is_file():
        restore_rng(_read_json(rng))
    else:  # fewer processes than now: this rank keeps its seeded RNG
        log.warning("train.resume_rng_missing", extra={"rank": rank, "path": str(rng)})
