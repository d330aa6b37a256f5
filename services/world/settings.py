"""Settings of the world service (``STABLEALIGN_<FIELD>`` environment variables, flags win).

The defaults of a world's backends live here rather than in the spec so that one deployment
can point every world at, say, a TGI server without each client naming it.
"""

from __future__ import annotations

import os
import socket

from pydantic import Field, model_validator

from stablealign.core.config import env_name
from stablealign.core.errors import ValidationError
from stablealign.llm.endpoints import REMOTE_BACKENDS, resolve_endpoint
from stablealign.sandbox.data import data_dir
from stablealign.serving.settings import ServiceSettings

# Backends that run the model inside the agent/observer process.
LOCAL_BACKENDS = frozenset({"hf"})


class WorldSettings(ServiceSettings):
    request_timeout_seconds: float = Field(1800.0, gt=0, description=(
        "Seconds to wait for one agent/observer reply before the bus sends it again, for remote LLM backends "
        "(openai, tgi, offline), while the replica on it sends heartbeats (a silent one is left after "
        "request_liveness_seconds). Its model calls may wait their turn under the backend's adaptive concurrency "
        "limit (a one-request-at-a-time server takes a round's calls one by one), and a hung model is caught by "
        "the replica's llm_deadline_seconds of time without progress: this is a backstop. A re-send to a replica "
        "still working on it joins that work."))
    local_request_timeout_seconds: float = Field(1800.0, gt=0, description=(
        "The same for models in the agent/observer process (hf): on a CPU a reply waits its turn in the model's "
        "batch and may take minutes, so only a replica that is gone should make it time out."))
    request_attempts: int = Field(3, ge=1, description=(
        "Tries of one NATS request (timeouts and \"no responders\" only; a killed replica loses nothing)."))
    interaction_attempts: int = Field(3, ge=1, description=(
        "Tries of one whole interaction before the failure budget below is consulted. A failure no retry can fix "
        "fails the world at once, naming the step: a bad request (400, 404), and an LLM server's own 4xx (400, 401, "
        "403, 404, 422...; not 408, 409, 429) with its status and reason."))
    # The failure budget: how long a world rides out missing replicas and failing LLMs before it goes FAILED.
    absent_budget_seconds: float = Field(120.0, ge=0, description=(
        "How long an interaction may keep finding a service it needs (agent, observer, JetStream) absent - no "
        "responders, timeouts, unavailable - while no interaction of the world succeeds, before the world goes "
        "FAILED; meanwhile it waits with capped, jittered exponential backoff and tries again."))
    error_budget_consecutive: int = Field(20, ge=0, description=(
        "How many failed tries in a row (LLM backend errors, internal errors) one interaction may have while no "
        "interaction of the world succeeds, before the world goes FAILED. A success anywhere in the world resets "
        "the count."))
    failure_backoff_max_seconds: float = Field(10.0, gt=0, description=(
        "Longest wait between two tries of an interaction within the failure budget (full jitter below it)."))
    lease_seconds: float = Field(30.0, gt=0, description="A world whose owner has not written a heartbeat for "
                                                         "this long may be taken over.")
    heartbeat_seconds: float = Field(0.0, ge=0, description="How often the owner of a world writes its heartbeat "
                                                            "(0: lease_seconds / 3).")
    progress_seconds: float = Field(1.0, ge=0, description=(
        "How often a running world's records_published is written to KV when it changed (0: with the heartbeat)."))
    resume_interval_seconds: float = Field(0.0, ge=0, description="How often unowned or orphaned worlds are looked "
                                                                  "for (0: lease_seconds / 2).")
    max_interaction_concurrency: int = Field(1024, ge=0, description="Upper bound on interactions in flight per "
                                                                     "world, whatever the spec asks (0: no bound).")
    batch_requests: bool = Field(True, description=(
        "Send an interaction's k feedback requests as one NATS batch, and each pair of ratings as another "
        "(bus.request_batch): one round trip per wave instead of one per request. false: one request each, "
        "for agents and observers older than batching (they do not answer '<subject>.batch')."))
    prior_publish_chunk: int = Field(64, ge=1, description="Prior memory batches published at once while seeding "
                                                           "a world.")
    max_world_memory_mb: float = Field(2048.0, ge=0, description=(
        "CreateWorld refuses a world whose estimated memory (all processes together, services/world/limits.py) "
        "exceeds this many MB, and a replica starts or resumes no world while the estimates of the worlds it runs "
        "would exceed it together (UNAVAILABLE, try later); the default is the world pod's memory limit in "
        "deploy/k8s/base/world.yaml (2Gi) and admits one round of about 60,000 agents (0: no limit)."))
    max_running_worlds: int = Field(8, ge=0, description=(
        "Worlds one replica runs at once; CreateWorld and ResumeWorld past it answer UNAVAILABLE (503) and the "
        "resume scan leaves further orphaned worlds to other replicas (0: no bound)."))
    # Files a world spec may name (prior_path, questions_path): only under these directories.
    world_data_roots: tuple[str, ...] = Field(default_factory=lambda: (str(data_dir()),), description=(
        "Directories whose files a world spec may name as prior_path or questions_path, comma-separated "
        "(symlinks resolved; default: the shared data directory, STABLEALIGN_DATA_DIR or ../shared/data)."))
    # Backends of a world whose spec names none.
    agent_backend: str = "offline"
    agent_model: str = ""
    agent_url: str = ""
    observer_backend: str = "offline"
    observer_model: str = ""
    observer_url: str = ""
    embedding_backend: str = "offline"
    embedding_model: str = ""
    embedding_url: str = ""

    @model_validator(mode="after")
    def _default_urls_are_configured_endpoints(self) -> WorldSettings:
        """A default URL that no agent would call (not in STABLEALIGN_LLM_ENDPOINTS) fails at start, not every
        CreateWorld."""
        for role in ("agent", "observer", "embedding"):
            backend, url = getattr(self, f"{role}_backend"), getattr(self, f"{role}_url")
            if url.strip() and backend.strip().lower() in REMOTE_BACKENDS:
                try:
                    resolve_endpoint(backend, url, field=role)
                except ValidationError as exc:
                    raise ValueError(f"{env_name(role + '_url')}: {exc}") from None
        return self

    def request_timeout(self, backend: str) -> float:
        """The reply deadline for a call served by ``backend`` (see the two timeouts above)."""
        return self.local_request_timeout_seconds if backend in LOCAL_BACKENDS else self.request_timeout_seconds

    @property
    def owner(self) -> str:
        """This replica's name in World.owner: the configured instance, else hostname-pid."""
        return self.instance or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3

    @property
    def resume_interval(self) -> float:
        return self.resume_interval_seconds or self.lease_seconds / 2
