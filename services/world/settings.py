"""Settings of the world service (``STABLEALIGN_<FIELD>`` environment variables, flags win).

The defaults of a world's backends live here rather than in the spec so that one deployment
can point every world at, say, a TGI server without each client naming it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from stablealign.config import ServiceSettings, env_name
from stablealign.errors import ConfigError

# Backends that run the model inside the agent/observer process.
LOCAL_BACKENDS = frozenset({"hf"})


@dataclass(frozen=True)
class WorldSettings(ServiceSettings):
    # Seconds to wait for one agent/observer reply before the bus sends it again, for remote LLM
    # backends (openai, tgi, offline). A re-send to a replica still working on it joins that work.
    request_timeout_seconds: float = 120.0
    # The same for models in the agent/observer process (hf): on a CPU a reply waits its turn in the
    # model's batch and may take minutes, so only a replica that is gone should make it time out.
    local_request_timeout_seconds: float = 1800.0
    # Tries of one NATS request (timeouts and "no responders" only; a killed replica loses nothing).
    request_attempts: int = 3
    # Tries of one whole interaction before the world goes FAILED.
    interaction_attempts: int = 3
    # A world whose owner has not written a heartbeat for this long may be taken over.
    lease_seconds: float = 30.0
    # How often the owner of a world writes its heartbeat (0: lease_seconds / 3).
    heartbeat_seconds: float = 0.0
    # How often a running world's records_published is written to KV when it changed (0: with the heartbeat).
    progress_seconds: float = 1.0
    # How often unowned or orphaned worlds are looked for (0: lease_seconds / 2).
    resume_interval_seconds: float = 0.0
    # Upper bound on interactions in flight per world, whatever the spec asks (0: no bound).
    max_interaction_concurrency: int = 1024
    # Prior memory batches published at once while seeding a world.
    prior_publish_chunk: int = 64
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

    def validate(self) -> None:
        super().validate()
        for name in ("request_timeout_seconds", "local_request_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{env_name(name)} must be > 0")
        for name in ("request_attempts", "interaction_attempts", "prior_publish_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{env_name(name)} must be >= 1")
        if self.lease_seconds <= 0:
            raise ConfigError(f"{env_name('lease_seconds')} must be > 0")
        if self.heartbeat_seconds < 0 or self.resume_interval_seconds < 0 or self.progress_seconds < 0:
            raise ConfigError("heartbeat and resume intervals must be >= 0")
        if self.max_interaction_concurrency < 0:
            raise ConfigError(f"{env_name('max_interaction_concurrency')} must be >= 0")

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
