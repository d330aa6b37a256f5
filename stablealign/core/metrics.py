"""Prometheus metrics shared by all services (prefix ``stablealign_``, base units, small label sets).

Services declare their own metrics next to their logic; the ones here are common to every
process: request counts/latencies per transport and LLM call accounting per backend.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "stablealign_requests_total",
    "Requests handled, by service, method, transport (grpc|nats) and outcome code.",
    ["service", "method", "transport", "code"],
)
REQUEST_SECONDS = Histogram(
    "stablealign_request_duration_seconds",
    "Time to handle one request.",
    ["service", "method", "transport"],
    buckets=LATENCY_BUCKETS,
)
BUS_REQUEST_RETRIES = Counter(
    "stablealign_bus_request_retries_total",
    "NATS requests sent again, by subject and reason (timeout: no reply in time; no_responders: no replica "
    "subscribed; reconnecting: the client was reconnecting).",
    ["subject", "reason"],
)
REQUESTS_IN_FLIGHT = Gauge(
    "stablealign_requests_in_flight",
    "NATS requests this replica has taken and not answered yet (waiting for a handler slot or running), by "
    "service: the pending work that KEDA scales agents and observers on (deploy/k8s/components/keda).",
    ["service"],
)
REQUESTS_JOINED = Counter(
    "stablealign_requests_joined_total",
    "Requests that arrived while an identical request was in flight on the same replica and took its reply "
    "instead of starting the work again (a requester's re-send).",
    ["service", "method"],
)
REPLIES_REFUSED = Counter(
    "stablealign_replies_refused_total",
    "Requests whose reply subject is not a reply inbox (e.g. a stream's or a bucket's subject): not served "
    "and not answered, by service and kind (request|discovery).",
    ["service", "kind"],
)
REQUESTS_SHED = Counter(
    "stablealign_requests_shed_total",
    "Requests answered with an error before any work, by service, method and reason (too_large: over "
    "max_request_bytes; busy: max_queued_requests already waiting for a slot).",
    ["service", "method", "reason"],
)
ENTRIES_SKIPPED = Counter(
    "stablealign_entries_skipped_total",
    "Bucket entries and stream messages a reader skipped because they do not parse as what the bucket or "
    "stream holds (e.g. a world entry that is not a World of its key), by source (bucket or stream name).",
    ["source"],
)
LLM_REQUESTS = Counter(
    "stablealign_llm_requests_total",
    "LLM backend calls, by backend, operation (chat|embed) and outcome (ok|retry|error).",
    ["backend", "operation", "outcome"],
)
LLM_SECONDS = Histogram(
    "stablealign_llm_request_duration_seconds",
    "Latency of one successful LLM backend call, retries included.",
    ["backend", "operation"],
    buckets=LATENCY_BUCKETS,
)
LLM_CONCURRENCY_LIMIT = Gauge(
    "stablealign_llm_concurrency_limit",
    "Calls this process lets be in flight at once to an LLM endpoint, by backend and endpoint (its URL, "
    "redacted): learned from the endpoint's latency for remote backends (backends/limiter.py), fixed otherwise.",
    ["backend", "endpoint"],
)
LLM_TOKENS = Counter(
    "stablealign_llm_tokens_total",
    "Tokens processed by LLM backends, by kind (prompt|completion) and task (draft, feedback, revise, "
    "rate_alignment, rate_engagement, chat): what each step of an interaction costs.",
    ["backend", "kind", "task"],
)


def counter_value(name: str, **labels: str) -> float:
    """Sum of a counter of this process over the samples whose labels match ``labels`` (0 if none):
    lets the embedded stack report what its services counted, e.g. retries during a run."""
    from prometheus_client import REGISTRY

    total = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP server (a daemon thread); ``stop`` frees its port and thread."""

    httpd: WSGIServer
    thread: threading.Thread
    host: str
    port: int

    def stop(self, timeout: float = 5.0) -> None:
        """Blocks until the serving thread ends (up to half a second: its poll interval)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout)


def serve_metrics(port: int, host: str = "127.0.0.1") -> MetricsServer | None:
    """Serves ``/metrics`` on its own port (-1: disabled, 0: a free port).

    Raises ``OSError`` (e.g. ``EADDRINUSE``) when the port cannot be bound.
    """
    if port < 0:
        return None
    httpd, thread = start_http_server(port, addr=host)
    return MetricsServer(httpd=httpd, thread=thread, host=host, port=httpd.server_port)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int | None:
    """Serves ``/metrics`` for the life of the process (-1: disabled, 0: a free port); returns the port."""
    server = serve_metrics(port, host)
    return server.port if server else None
