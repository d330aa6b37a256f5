"""Makes a running service discoverable with the standard NATS tooling (``nats micro ls|info|stats``).

Implements the responder side of the NATS service API (ADR-32, ``io.nats.micro.v1``): every
replica answers ``$SRV.PING|INFO|STATS``, ``$SRV.<verb>.<name>`` and ``$SRV.<verb>.<name>.<id>``
with the JSON documents of the spec, built with nats-py's own ``nats.micro`` model classes so the
field names and formats are the library's.

Only the discovery side: the requests themselves stay on ``RequestServer``, which runs each
one in its own task (a ``nats.micro`` endpoint handles one message at a time). The endpoints and
their counters (requests, errors, processing time) are the RequestServer's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.service import (
    DEFAULT_PREFIX,
    NAME_REGEX,
    EndpointInfo,
    EndpointStats,
    ServiceInfo,
    ServicePing,
    ServiceStats,
    ServiceVerb,
    control_subject,
)
from nats.nuid import NUID

from stablealign import __version__
from stablealign.core import metrics
from stablealign.core.logs import get_logger
from stablealign.nats.reply_subjects import is_reply_inbox
from stablealign.nats.server import RequestServer

log = get_logger(__name__)

NAME_PREFIX = "stablealign-"


def service_name(name: str) -> str:
    """The service API name of one of our services, e.g. ``stablealign-agent`` (A-Z a-z 0-9 - _ only)."""
    full = f"{NAME_PREFIX}{name}"
    if not NAME_REGEX.match(full):
        raise ValueError(f"invalid NATS service name {full!r}: use only letters, digits, '-' and '_'")
    return full


@dataclass
class Discovery:
    """The ``$SRV`` responders of one service replica; ``start`` subscribes, ``stop`` unsubscribes."""

    nc: NATS
    requests: RequestServer
    name: str  # the service API name, e.g. "stablealign-agent"
    description: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    version: str = __version__
    id: str = field(default_factory=lambda: NUID().next().decode())
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    _subs: list = field(default_factory=list, init=False)

    async def start(self) -> Discovery:
        handlers = {ServiceVerb.PING: self._ping, ServiceVerb.INFO: self._info, ServiceVerb.STATS: self._stats}
        for verb, handler in handlers.items():
            # No queue group: every replica answers, which is how a client counts them.
            for subject in (control_subject(verb, prefix=DEFAULT_PREFIX),
                            control_subject(verb, self.name, prefix=DEFAULT_PREFIX),
                            control_subject(verb, self.name, self.id, prefix=DEFAULT_PREFIX)):
                self._subs.append(await self.nc.subscribe(subject, cb=handler))
        self.started = datetime.now(UTC)
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection is already closed
                pass

    # --- the documents ---------------------------------------------------------------------

    def ping(self) -> dict:
        return ServicePing(id=self.id, name=self.name, version=self.version, metadata=self.metadata).to_dict()

    def info(self) -> dict:
        return ServiceInfo(
            id=self.id, name=self.name, version=self.version, description=self.description,
            metadata=self.metadata,
            endpoints=[EndpointInfo(name=e.name, subject=e.subject, queue_group=e.queue_group, metadata={})
                       for e in self.requests.endpoints],
        ).to_dict()

    def stats(self) -> dict:
        document = ServiceStats(
            id=self.id, name=self.name, version=self.version, metadata=self.metadata,
            started=self.started.replace(tzinfo=None),  # to_dict writes it as UTC with a "Z"
            endpoints=[EndpointStats(name=e.name, subject=e.subject, queue_group=e.queue_group,
                                     num_requests=e.num_requests, num_errors=e.num_errors,
                                     last_error=e.last_error, processing_time=e.processing_ns,
                                     average_processing_time=e.average_processing_ns)
                       for e in self.requests.endpoints],
        ).to_dict()
        return document

    # --- the responders ----------------------------------------------------------------------

    async def _reply(self, msg: Msg, document: dict) -> None:
        if not msg.reply:
            return
        if not is_reply_inbox(msg.reply):  # e.g. $SRV.INFO with a bucket's subject as its reply: dropped
            metrics.REPLIES_REFUSED.labels(self.requests.service, "discovery").inc()
            log.warning("discovery.reply_refused", extra={"service": self.name, "subject": msg.subject,
                                                          "reply": msg.reply[:200]})
            return
        try:
            await msg.respond(json.dumps(document).encode())
        except Exception:  # noqa: BLE001 - the asker is gone or NATS is down: nothing to do
            log.warning("discovery.reply_failed", extra={"service": self.name, "subject": msg.subject})

    async def _ping(self, msg: Msg) -> None:
        await self._reply(msg, self.ping())

    async def _info(self, msg: Msg) -> None:
        await self._reply(msg, self.info())

    async def _stats(self, msg: Msg) -> None:
        await self._reply(msg, self.stats())


async def start_discovery(nc: NATS, requests: RequestServer, name: str, *, description: str = "",
                          metadata: dict[str, str] | None = None) -> Discovery:
    """Answers the NATS service API for the service ``name`` (e.g. "agent") of this connection."""
    discovery = Discovery(nc=nc, requests=requests, name=service_name(name), description=description,
                          metadata={k: str(v) for k, v in (metadata or {}).items()})
    return await discovery.start()
