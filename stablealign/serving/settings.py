"""The settings every service process reads: ``ServiceSettings``, which each service extends.

Why here and not in ``stablealign.core.config``: a service's settings gather the fields of several rooms
(the NATS client's and streams', the gRPC server's TLS, the LLM endpoints), and the core room that holds
the settings loader must not import the rooms built on it.
"""

from __future__ import annotations

from pydantic import Field

from stablealign.core.config import NatsClientSettings, NatsUrl, Port, ProcessSettings
from stablealign.llm.endpoints import LLMEndpointSettings
from stablealign.nats.streams import StreamSettings
from stablealign.serving.tls import GrpcServerTlsSettings


class ServiceSettings(ProcessSettings, NatsClientSettings, StreamSettings, GrpcServerTlsSettings, LLMEndpointSettings):
    """What every service process needs; services extend it with their own fields."""

    nats_url: NatsUrl = Field("nats://127.0.0.1:4222", description="NATS server URL (nats://, tls://, ws://, wss://).")
    grpc_port: Port = Field(0, description="gRPC port; 0: pick a free port (logged); -1: no gRPC server.")
    grpc_host: str = Field("127.0.0.1", description="gRPC bind address.")
    metrics_port: Port = Field(-1, description="Prometheus /metrics port; -1: no /metrics server; 0: a free port.")
    max_concurrency: int = Field(256, ge=1, description="Requests in flight at once per process (NATS handlers "
                                                        "and gRPC calls).")
    max_request_bytes: int = Field(1 << 20, ge=1, description="Largest request accepted, bytes (gRPC and NATS).")
    max_queued_requests: int = Field(4096, ge=0, description=(
        "NATS requests taken beyond max_concurrency, waiting for a slot; one more is answered UNAVAILABLE (503) at "
        "once, before any work, so a burst from one client cannot grow the process without bound."))
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="Seconds to finish in-flight work after SIGTERM.")
    instance: str = Field("", description="Replica name in logs (and a world's owner).")
    request_liveness_seconds: float = Field(10.0, gt=0, description=(
        "A NATS request this process sends is sent again when the replica on it has sent no heartbeat for this "
        "long (it died); a live replica sends one every quarter of it, however long its model takes."))
    llm_deadline_seconds: float = Field(90.0, gt=0, description=(
        "Longest one LLM call of an agent/observer step may go without progress (backend retries included; time "
        "waiting for a place under the backend's concurrency limit not counted, a streamed token restarts it): "
        "past it the call is cancelled and the step answers UNAVAILABLE naming the step, the model and its "
        "endpoint. Keep it below the world's request_timeout_seconds."))
    gc_gen0_threshold: int = Field(20_000, ge=0, description=(
        "Allocations between two young-generation collections of the cycle collector once the process serves "
        "(gen-1 and gen-2 thresholds stay at 10); 0: the interpreter's default (700). The default keeps most "
        "of the collector's work out of a round (docs/benchmarks.md)."))
    local_llm_deadline_seconds: float = Field(1500.0, gt=0, description=(
        "The same for models in the agent/observer process (hf), whose calls wait their turn in the batch; "
        "keep it below the world's local_request_timeout_seconds."))
