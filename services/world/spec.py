"""The world spec declared once (SPEC_FIELDS), its validation and the resolution of every default,
once, at CreateWorld.

Each field's option (name, flag, type, default, help), WorldSpec field and bounds are one SpecField:
``stable-align run``'s and ``pipeline``'s options, :func:`build_spec` (run's options -> WorldSpec, also
the bench's), and the bounds and defaults CreateWorld applies over gRPC and NATS all come from it.

The resolved spec is what goes into the SANDBOX_WORLDS bucket: the agent and observer services
read radius, models, retrieval settings and one label per agent from it without knowing any
default, and a resumed world runs on exactly the values it started with, even if the service's
defaults changed in between.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from services.world import grid
from services.world.limits import check_world_memory
from services.world.settings import WorldSettings
from stablealign.core.config import env_name
from stablealign.core.errors import ValidationError
from stablealign.llm.backends import BACKENDS, default_chat_model, default_embedding_model
from stablealign.llm.backends.embeddings import HASHING_MODEL
from stablealign.llm.confine import confined_path
from stablealign.llm.endpoints import resolve_endpoint
from stablealign.nats.subjects import MAX_BATCH_ITEMS
from stablealign.sandbox import data
from stablealign.sandbox.memory import DEFAULT_RETRIEVAL_K, DEFAULT_RETRIEVAL_THRESHOLD
from stablealign.sandbox.worlds import check_world_id
from stablealign.v1 import common_pb2, world_pb2

MAX_SIZE = 1000
MAX_ROUNDS = 100_000
# An interaction's k feedback requests go out as one batch (bus.request_batch), which holds at most this many.
MAX_PARTNERS = MAX_BATCH_ITEMS
# Cosine-distance thresholds of retrieval. The original's 0.3 was tuned for OpenAI (ada-002)
# embeddings; all-MiniLM-L6-v2 (and the hashing embedder) place related questions much further
# apart (top-1 similarity of a pool question to 50 priors: median 0.39, 90th percentile 0.54), so
# 0.3 would retrieve almost nothing and agents could not learn from their memories.
LOCAL_EMBEDDING_RETRIEVAL_THRESHOLD = 0.75


@dataclass(frozen=True)
class SpecField:
    """One field of a world spec, declared once: the option of ``stable-align run`` that sets it (name,
    flag, type, default, help), the WorldSpec field it fills, and the bounds CreateWorld checks.

    ``stable-align run`` and ``pipeline`` generate their options from these (``stablealign_app.cli.
    spec_options``), :func:`build_spec` turns option values into a WorldSpec, the bench builds its specs
    with it, and :func:`resolve_spec` checks the bounds and fills the defaults from it — so a default or a
    bound changed here changes every one of them.
    """

    name: str  # the option's parameter (and build_spec's keyword)
    kind: type  # int | float | str (list: no command-line form)
    default: Any  # what a spec gets when nobody chooses (the option's default)
    help: str
    proto: str  # the WorldSpec field it fills: "size", "agent_model.backend"
    flag: str = ""  # the option's flag ("": --name-with-dashes)
    option: bool = True  # False: only through the API (CreateWorld), no flag of `run`
    choices: tuple[str, ...] = ()  # the option's allowed values (checked by the command line)
    minimum: float | None = None  # bounds CreateWorld checks (inclusive)
    maximum: float | None = None
    unset: Any = None  # the wire value meaning "not chosen" (None: every value is a choice)
    unset_means: str = ""  # what the service makes of it; "": the default above
    inherit: str = ""  # an option whose value this one takes when left empty (observer_model <- model)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def filled_by_service(self) -> bool:
        """The service puts ``default`` where the wire holds ``unset`` (0 partners: 4)."""
        return self.unset is not None and not self.unset_means

    def bounds(self) -> str:
        """``in 1..1000`` / ``in [0, 1]`` / ``>= 0``, and what the unset value means: ``(0: 4)``."""
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            text = f"in {lo}..{hi}" if self.kind is int else f"in [{lo:g}, {hi:g}]"
        else:
            text = f">= {lo:g}" if lo is not None else f"<= {hi:g}"
        if self.unset is not None:
            text += f" ({self.unset:g}: {self.unset_means or self.default})"
        return text

    def within(self, value: Any) -> bool:
        """Inside the bounds (NaN never is); the unset value always is."""
        if self.unset is not None and value == self.unset:
            return True
        return (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)


_CHOSEN_SETTINGS = tuple(s for s in grid.SETTINGS if s != "custom")  # custom needs labels: API only

# Every WorldSpec field, in the order of `stable-align run --help`.
SPEC_FIELDS: tuple[SpecField, ...] = (
    SpecField("size", int, 3, "Grid side S: S x S agents.", "size", minimum=1, maximum=MAX_SIZE),
    SpecField("rounds", int, 2, "Rounds; each gives every agent one interaction.", "rounds",
              minimum=1, maximum=MAX_ROUNDS),
    SpecField("setting", str, grid.DEFAULT_SETTING, "Initial personas.", "setting", choices=_CHOSEN_SETTINGS,
              unset="", unset_means=f"{grid.DEFAULT_SETTING}, or custom when labels are given"),
    SpecField("labels", list, (), "One persona per agent, row by row (setting custom).", "labels", option=False),
    SpecField("backend", str, "offline", "LLM backend of the agents (and observers).", "agent_model.backend",
              choices=BACKENDS, unset="", unset_means="the world service's agent_backend"),
    SpecField("seed", int, 1, "World seed: personas, questions, partners, sampling.", "seed"),
    SpecField("model", str, "", "Chat model (openai), a known model name or local path (hf: "
              "smollm2-135m-instruct), label (tgi).", "agent_model.model"),
    SpecField("url", str, "", "TGI server URL (tgi) or OpenAI-compatible base URL (openai).", "agent_model.url"),
    SpecField("observer_backend", str, "", "Observer backend (default: --backend).", "observer_model.backend",
              inherit="backend"),
    SpecField("observer_model", str, "", "Observer model (default: --model).", "observer_model.model",
              inherit="model"),
    SpecField("observer_url", str, "", "Observer server URL (default: --url).", "observer_model.url",
              inherit="url"),
    SpecField("embedding_backend", str, "", "offline (all-MiniLM-L6-v2) or openai.", "embedding_model.backend"),
    SpecField("embedding_model", str, "", "Embedding model; 'hashing' = fast, no model.", "embedding_model.model"),
    SpecField("embedding_url", str, "", "Embedding server URL (openai; run: --url when both backends are openai).",
              "embedding_model.url", option=False),
    SpecField("partners", int, 4, "Feedback partners per draft, k = min(partners, #neighbours).", "partners",
              minimum=0, maximum=MAX_PARTNERS, unset=0),
    SpecField("radius", float, 0.0, "Neighbour radius; 0 = S // 2.", "radius", minimum=0.0, unset=0.0,
              unset_means="S // 2"),
    SpecField("global_partner_probability", float, 0.0, "Chance a partner comes from anywhere.",
              "global_partner_probability", flag="--global-prob", minimum=0.0, maximum=1.0),
    SpecField("concurrency", int, 0, "Interactions at once; 0 = a whole round.", "concurrency", minimum=0,
              unset=0, unset_means="all agents of a round"),
    SpecField("prior_size", int, 50, "Prior memories per agent.", "prior_size", minimum=0, unset=-1),
    SpecField("prior", str, "", "Prior file (HH-RLHF jsonl[.gz]); default ../shared/data.", "prior_path"),
    SpecField("questions", str, "", "Question pool file; default ../shared/data.", "questions_path"),
    SpecField("world_id", str, "", "World id (default: generated).", "world_id"),
    SpecField("retrieval_k", int, DEFAULT_RETRIEVAL_K, "Memories retrieved per draft.", "retrieval_k",
              option=False, minimum=0, unset=0),
    SpecField("retrieval_threshold", float, 0.0, "Cosine-distance threshold of retrieval.", "retrieval_threshold",
              option=False, minimum=0.0, maximum=2.0, unset=0.0,
              unset_means=f"{DEFAULT_RETRIEVAL_THRESHOLD} for openai embeddings, "
                          f"{LOCAL_EMBEDDING_RETRIEVAL_THRESHOLD} for local ones"),
)
FIELDS: dict[str, SpecField] = {f.name: f for f in SPEC_FIELDS}
OPTION_FIELDS: tuple[SpecField, ...] = tuple(f for f in SPEC_FIELDS if f.option)


def spec_value(spec: world_pb2.WorldSpec, path: str) -> Any:
    """The value at a dotted WorldSpec path (``agent_model.backend``)."""
    value: Any = spec
    for part in path.split("."):
        value = getattr(value, part)
    return value


def check_bounds(spec: world_pb2.WorldSpec) -> None:
    """ValidationError naming the first field outside its bounds (SPEC_FIELDS order)."""
    for field in SPEC_FIELDS:
        if field.minimum is None and field.maximum is None:
            continue
        value = spec_value(spec, field.proto)
        if not field.within(value):
            raise ValidationError(f"{field.proto} must be {field.bounds()}, got {value}")


def fill_defaults(spec: world_pb2.WorldSpec) -> None:
    """Puts each field's default where the wire holds its unset value (or an optional field is absent)."""
    for field in SPEC_FIELDS:
        if not field.filled_by_service or "." in field.proto:
            continue
        absent = _optional(field.proto) and not spec.HasField(field.proto)
        if absent or getattr(spec, field.proto) == field.unset:
            setattr(spec, field.proto, field.default)


def _optional(proto: str) -> bool:
    return world_pb2.WorldSpec.DESCRIPTOR.fields_by_name[proto].has_presence


def build_spec(**values: Any) -> world_pb2.WorldSpec:
    """The WorldSpec that ``stable-align run`` sends for these option values (by field name; a field not
    given takes its default). An empty observer option takes the agent's (``inherit``); the embedder is
    the backend's own where it has one (OpenAI, from the same server), else offline (all-MiniLM-L6-v2)."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise TypeError(f"build_spec: {unknown} are not world-spec fields")
    # An API-only field not given stays unset on the wire: the service resolves it.
    chosen = {f.name: values.get(f.name) for f in SPEC_FIELDS}
    for field in OPTION_FIELDS:
        if chosen[field.name] is None:
            chosen[field.name] = field.default
    for field in SPEC_FIELDS:
        if field.inherit and not chosen[field.name]:
            chosen[field.name] = chosen[field.inherit]
    if not chosen["embedding_backend"]:
        chosen["embedding_backend"] = "openai" if chosen["backend"] == "openai" else "offline"
    if chosen["embedding_url"] is None and chosen["embedding_backend"] == "openai" == chosen["backend"]:
        chosen["embedding_url"] = chosen["url"]
    spec = world_pb2.WorldSpec()
    for field in SPEC_FIELDS:
        value = chosen[field.name]
        if value is None:
            continue
        *parents, leaf = field.proto.split(".")
        target = spec
        for part in parents:
            target = getattr(target, part)
        if field.kind is list:
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)
    return spec


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

    Bounds and defaults are those of SPEC_FIELDS (what each unset value means is its ``unset_means``);
    the world id is generated, backends and models come from the service settings. ``check_files``
    also opens the prior and question files so that a wrong path fails CreateWorld rather than the
    world later.
    """
    settings = settings or WorldSettings()
    out = world_pb2.WorldSpec()
    out.CopyFrom(spec)
    if not out.world_id:
        out.world_id = new_world_id()
    else:
        check_world_id(out.world_id)
    check_bounds(out)
    fill_defaults(out)
    if not out.setting:
        out.setting = "custom" if len(out.labels) else FIELDS["setting"].default
    if out.setting not in grid.SETTINGS:
        raise ValidationError(f"unknown setting {out.setting!r}; expected one of {', '.join(grid.SETTINGS)}")
    labels = grid.make_labels(out.setting, out.size, out.seed, list(out.labels))
    if out.setting != "custom" and len(out.labels) and list(out.labels) != labels:
        # (equal labels are the resolved spec itself, resolved again)
        raise ValidationError(f"labels are only allowed with setting custom (setting is {out.setting!r})")
    del out.labels[:]
    out.labels.extend(labels)
    if out.radius == 0:
        out.radius = grid.default_radius(out.size)
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
