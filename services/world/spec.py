"""Validation of a WorldSpec and resolution of every default, once, at CreateWorld.

The resolved spec is what goes into the SANDBOX_WORLDS bucket: the agent and observer services
read radius, models, retrieval settings and one label per agent from it without knowing any
default, and a resumed world runs on exactly the values it started with, even if the service's
defaults changed in between.
"""

from __future__ import annotations

import secrets

from services.world import grid
from services.world.limits import check_world_memory
from services.world.settings import WorldSettings
from stablealign import data
from stablealign.backends import BACKENDS, default_chat_model, default_embedding_model
from stablealign.backends.embeddings import HASHING_MODEL
from stablealign.bus import MAX_BATCH_ITEMS
from stablealign.config import env_name
from stablealign.confine import confined_path
from stablealign.endpoints import resolve_endpoint
from stablealign.errors import ValidationError
from stablealign.memory import DEFAULT_RETRIEVAL_K, DEFAULT_RETRIEVAL_THRESHOLD
from stablealign.v1 import common_pb2, world_pb2
from stablealign.worlds import check_world_id

MAX_SIZE = 1000
MAX_ROUNDS = 100_000
# An interaction's k feedback requests go out as one batch (bus.request_batch), which holds at most this many.
MAX_PARTNERS = MAX_BATCH_ITEMS
DEFAULT_PARTNERS = 4
DEFAULT_PRIOR_SIZE = 50
# Cosine-distance thresholds of retrieval. The original's 0.3 was tuned for OpenAI (ada-002)
# embeddings; all-MiniLM-L6-v2 (and the hashing embedder) place related questions much further
# apart (top-1 similarity of a pool question to 50 priors: median 0.39, 90th percentile 0.54), so
# 0.3 would retrieve almost nothing and agents could not learn from their memories.
LOCAL_EMBEDDING_RETRIEVAL_THRESHOLD = 0.75


def new_world_id() -> str:
    return f"w-{secrets.token_hex(6)}"


def _chat_model(
    ref: common_pb2.ModelRef, role: str, backend: str, model: str, url: str
) -> common_pb2.ModelRef:
    out = common_pb2.ModelRef()
    out.CopyFrom(ref)
    if not out.backend:
        out.backend = backend
        out.model = out.model or model
        out.url = out.url or url
    if out.backend not in BACKENDS:
        raise ValidationError(
            f"{role}.backend {out.backend!r} is unknown; expected one of {', '.join(BACKENDS)}"
        )
    if not out.model:
        if out.backend == "hf":
            raise ValidationError(f"{role}: the hf backend needs a model path")
        out.model = default_chat_model(out.backend)  # honours STABLEALIGN_OPENAI_CHAT_MODEL
    if out.backend == "tgi" and not out.url:
        raise ValidationError(f"{role}: the tgi backend needs the server's url")
    return out


def _embedding_model(ref: common_pb2.ModelRef, settings: WorldSettings) -> common_pb2.ModelRef:
    out = common_pb2.ModelRef()
    out.CopyFrom(ref)
    if not out.backend:
        out.backend = settings.embedding_backend
        out.model = out.model or settings.embedding_model
        out.url = out.url or settings.embedding_url
    if out.backend not in BACKENDS:
        raise ValidationError(
            f"embedding_model.backend {out.backend!r} is unknown; expected one of {', '.join(BACKENDS)}"
        )
    if not out.model:
        out.model = default_embedding_model(out.backend)
    return out


SPEC_FILES = ("prior_path", "questions_path")


def confined_files(spec: world_pb2.WorldSpec, settings: WorldSettings) -> world_pb2.WorldSpec:
    """A copy of ``spec`` whose file paths are the resolved paths inside ``world_data_roots``
    (ValidationError naming the field otherwise).

    Files only from the operator's directories: a spec must not publish any readable file as questions.
    The resolved path is what is stored and later opened, never the request's string resolved again
    (a symlink swapped in between would point elsewhere by then). The world's runner calls this again
    on the stored spec before it opens anything: the bucket is not the only writer it trusts.
    """
    out = world_pb2.WorldSpec()
    out.CopyFrom(spec)
    for field in SPEC_FILES:
        if getattr(out, field):
            resolved = confined_path(getattr(out, field), settings.world_data_roots, field,
                                     setting=env_name("world_data_roots"))
            setattr(out, field, str(resolved))
    return out


def resolve_spec(
    spec: world_pb2.WorldSpec, settings: WorldSettings | None = None, *, check_files: bool = True
) -> world_pb2.WorldSpec:
    """A copy of ``spec`` with every default filled in; ValidationError names the bad field.

    Defaults: world_id generated; setting half_half (custom when only labels are given);
    radius S // 2; partners 4; prior_size 50; retrieval_k 3, threshold 0.3 (OpenAI embeddings) or 0.75 (local); backends and models
    from the service settings. ``check_files`` also opens the prior and question files so that
    a wrong path fails CreateWorld rather than the world later.
    """
    settings = settings or WorldSettings()
    out = world_pb2.WorldSpec()
    out.CopyFrom(spec)
    if not out.world_id:
        out.world_id = new_world_id()
    else:
        check_world_id(out.world_id)
    if not 1 <= out.size <= MAX_SIZE:
        raise ValidationError(f"size must be in 1..{MAX_SIZE}, got {out.size}")
    if not 1 <= out.rounds <= MAX_ROUNDS:
        raise ValidationError(f"rounds must be in 1..{MAX_ROUNDS}, got {out.rounds}")
    if not out.setting:
        out.setting = "custom" if len(out.labels) else grid.DEFAULT_SETTING
    if out.setting not in grid.SETTINGS:
        raise ValidationError(f"unknown setting {out.setting!r}; expected one of {', '.join(grid.SETTINGS)}")
    labels = grid.make_labels(out.setting, out.size, out.seed, list(out.labels))
    if out.setting != "custom" and len(out.labels) and list(out.labels) != labels:
        # (equal labels are the resolved spec itself, resolved again)
        raise ValidationError(f"labels are only allowed with setting custom (setting is {out.setting!r})")
    del out.labels[:]
    out.labels.extend(labels)
    if not out.radius >= 0:  # also rejects NaN
        raise ValidationError(f"radius must be >= 0, got {out.radius}")
    if out.radius == 0:
        out.radius = grid.default_radius(out.size)
    if not 0.0 <= out.global_partner_probability <= 1.0:
        raise ValidationError(
            f"global_partner_probability must be in [0, 1], got {out.global_partner_probability}"
        )
    if not 0 <= out.partners <= MAX_PARTNERS:
        raise ValidationError(f"partners must be in 0..{MAX_PARTNERS} (0: {DEFAULT_PARTNERS}), got {out.partners}")
    out.partners = out.partners or DEFAULT_PARTNERS
    if out.concurrency < 0:
        raise ValidationError(f"concurrency must be >= 0 (0: all agents of a round), got {out.concurrency}")
    if out.prior_size < -1:
        raise ValidationError(f"prior_size must be >= 0 (-1: {DEFAULT_PRIOR_SIZE}), got {out.prior_size}")
    if not out.HasField("prior_size") or out.prior_size == -1:
        out.prior_size = DEFAULT_PRIOR_SIZE
    if out.retrieval_k < 0:
        raise ValidationError(f"retrieval_k must be >= 0 (0: {DEFAULT_RETRIEVAL_K}), got {out.retrieval_k}")
    out.retrieval_k = out.retrieval_k or DEFAULT_RETRIEVAL_K
    if not 0.0 <= out.retrieval_threshold <= 2.0:
        raise ValidationError(
            f"retrieval_threshold (a cosine distance) must be in [0, 2], got {out.retrieval_threshold}"
        )
    out.agent_model.CopyFrom(
        _chat_model(
            out.agent_model, "agent_model", settings.agent_backend, settings.agent_model, settings.agent_url
        )
    )
    out.observer_model.CopyFrom(
        _chat_model(
            out.observer_model,
            "observer_model",
            settings.observer_backend,
            settings.observer_model,
            settings.observer_url,
        )
    )
    out.embedding_model.CopyFrom(_embedding_model(out.embedding_model, settings))
    # Only the operator's backends and LLM endpoints (the agents and observers check again before a call:
    # they hold the keys, and the bus can be forged); an embedder named "hashing" calls nothing.
    for field, ref in (("agent_model", out.agent_model), ("observer_model", out.observer_model),
                       ("embedding_model", out.embedding_model)):
        if not (field == "embedding_model" and ref.model == HASHING_MODEL):
            resolve_endpoint(ref.backend, ref.url, field=field)
    out = confined_files(out, settings)
    if not out.retrieval_threshold:
        out.retrieval_threshold = (DEFAULT_RETRIEVAL_THRESHOLD if out.embedding_model.backend == "openai"
                                   else LOCAL_EMBEDDING_RETRIEVAL_THRESHOLD)
    if check_files:
        pairs = data.load_prior_pairs(out.prior_path or None)
        if out.prior_size > len(pairs):
            raise ValidationError(
                f"prior_size {out.prior_size} exceeds the {len(pairs)} pairs of the prior file"
            )
        data.load_questions(out.questions_path or None)
    # Memory before anything is stored: refused here, a too-large world never starts (limits.py).
    check_world_memory(out, settings.max_world_memory_mb, len(pairs) if check_files else None)
    return out
