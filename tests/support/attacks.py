"""What the attack suite (``tests/integration/test_attacks*.py``) shares: the owners of the streams, the victims
they seed, and the state compared before and after every route.

The owners connect as the world and the trainer users of the generated configuration (each may read only its
own streams), create their streams as their services do at start, and seed victims that an attack would
change: a FAILED world and a COMPLETED one, two records of the victim world, a QUEUED job that no scheduler
holds (a cancel that got through would end it) and a SUCCEEDED one, and a log line of each job.
``Owners.state`` reads every message of the worlds and jobs buckets, the records and the job logs (count,
last sequence, each sequence's subject and bytes); ``Owners.consumers`` counts each stream's consumers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import nats.js.errors
from nats.aio.client import Client as NATS

from services.trainer import streams as trainer_streams
from services.world import streams as world_streams
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.sandbox.memory import ensure_pool_stream
from stablealign.v1 import common_pb2, trainer_pb2, world_pb2
from tests.integration.test_nats_security import SecuredNats

OFFLINE = common_pb2.ModelRef(backend="offline")
VICTIM, OTHER = "victim", "other"  # worlds
JOB_VICTIM, JOB_OTHER = "job-victim", "job-other"
WORLDS_KV, JOBS_KV = f"KV_{subjects.WORLDS_BUCKET}", f"KV_{subjects.JOBS_BUCKET}"
# Every stream of the product, and who owns it (reads it here).
OWNER = {subjects.RECORDS_STREAM: "world", subjects.MEMORY_STREAM: "world", subjects.POOL_STREAM: "world",
         WORLDS_KV: "world", subjects.JOB_LOGS_STREAM: "trainer", JOBS_KV: "trainer"}
COMPARED = (WORLDS_KV, subjects.RECORDS_STREAM, JOBS_KV, subjects.JOB_LOGS_STREAM)
# Subjects an attack aims the server's or a service's publishes at: a world's and a job's entry, a world's records.
TARGETS = (f"$KV.{subjects.WORLDS_BUCKET}.{VICTIM}", f"sandbox.records.{VICTIM}", f"$KV.{subjects.JOBS_BUCKET}.{JOB_VICTIM}")

Snapshot = tuple[int, int, list[tuple[int, str, bytes]]]


async def snapshot(js, stream: str) -> Snapshot:
    """(messages, last sequence, every message's sequence, subject and bytes) of ``stream``."""
    info = await js.stream_info(stream)
    messages = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        messages.append((seq, msg.subject, msg.data))
    return info.state.messages, info.state.last_seq, messages


def denials(caplog) -> list[str]:
    """The server's permissions violations that the clients logged, lower-cased (nats-py lower-cases them)."""
    return [str(r.__dict__.get("error", "")).lower() for r in caplog.records if r.getMessage() == "nats.permission_denied"]


def refused_publish(subject: str) -> str:
    return f'permissions violation for publish to "{subject}"'.lower()


@dataclass
class Owners:
    """The world and trainer users' connections (``OWNER`` says which reads what)."""

    world: NATS
    trainer: NATS

    @classmethod
    async def connect(cls, secured: SecuredNats) -> Owners:
        world = await nats_client.connect(secured.url, "owner-world", options=secured.options("world"), give_up_after=5.0)
        trainer = await nats_client.connect(secured.url, "owner-trainer", options=secured.options("trainer"),
                                            give_up_after=5.0)
        return cls(world, trainer)

    def js(self, stream: str):
        return (self.world if OWNER[stream] == "world" else self.trainer).jetstream()

    async def declare(self) -> None:
        """Every stream and bucket, created by its owner as its service does at start."""
        await world_streams.declare_streams(self.world.jetstream())
        await ensure_pool_stream(self.world.jetstream())
        await trainer_streams.declare_streams(self.trainer.jetstream())

    async def seed_worlds(self) -> None:
        js = self.world.jetstream()
        kv = await js.key_value(subjects.WORLDS_BUCKET)
        for world_id, state in ((VICTIM, world_pb2.WORLD_STATE_FAILED), (OTHER, world_pb2.WORLD_STATE_COMPLETED)):
            world = world_pb2.World(spec=world_pb2.WorldSpec(world_id=world_id, size=2, rounds=1, agent_model=OFFLINE),
                                    state=state, error="boom" if state == world_pb2.WORLD_STATE_FAILED else "",
                                    created_at=1.0, updated_at=1.0)
            await kv.create(world_id, world.SerializeToString())
        for agent in (0, 1):
            record = common_pb2.InteractionRecord(world_id=VICTIM, round=0, agent_id=agent, question="q", draft_answer="a")
            await js.publish(f"sandbox.records.{VICTIM}", record.SerializeToString(),
                             headers={subjects.MSG_ID_HEADER: f"{VICTIM}.0.{agent}"})

    async def seed_jobs(self, spec: trainer_pb2.JobSpec | None = None) -> None:
        """A QUEUED victim (written, not submitted: no scheduler holds it) and a SUCCEEDED job, a log line each.
        Seed after the trainer service's start-up recovery, which would otherwise take the queued one up."""
        js = self.trainer.jetstream()
        kv = await js.key_value(subjects.JOBS_BUCKET)
        for job_id, state in ((JOB_VICTIM, trainer_pb2.JOB_STATE_QUEUED), (JOB_OTHER, trainer_pb2.JOB_STATE_SUCCEEDED)):
            job_spec = trainer_pb2.JobSpec(job_id=job_id, runner="local")
            if spec is not None:
                job_spec.MergeFrom(spec)
                job_spec.job_id = job_id
            job = trainer_pb2.Job(spec=job_spec, state=state, created_at=1.0, message="seeded")
            await kv.create(job_id, job.SerializeToString())
            line = trainer_pb2.LogLine(job_id=job_id, line=f"job {job_id} seeded", time=1.0)
            await js.publish(subjects.JOB_LOGS_SUBJECT.format(job_id=job_id), line.SerializeToString())

    async def state(self) -> dict[str, Snapshot]:
        return {stream: await snapshot(self.js(stream), stream) for stream in COMPARED}

    async def consumers(self) -> dict[str, int]:
        return {stream: (await self.js(stream).stream_info(stream)).state.consumer_count for stream in OWNER}

    async def close(self) -> None:
        for nc in (self.world, self.trainer):
            try:
                await nc.close()
            except Exception as exc:  # noqa: BLE001 - the server is going away with the test
                logging.getLogger(__name__).debug("close: %s", exc)


async def send_misdirected(nc: NATS, routes: Sequence[tuple[str, bytes, str]],
                           discovery: Sequence[tuple[str, str]]) -> None:
    """Sends each request of ``routes`` (subject, payload, forged reply) asking for 0.2 s heartbeats, and
    each ``$SRV`` ping of ``discovery`` (subject, forged reply), then waits past a few heartbeat periods
    (so that any reply or heartbeat that was going to be sent has been) and closes ``nc``."""
    try:
        for subject, payload, reply in routes:
            await nc.publish(subject, payload, reply=reply, headers={subjects.LIVENESS_HEADER: "0.2"})
        for subject, reply in discovery:
            await nc.publish(subject, b"", reply=reply)
        await nc.flush()
    finally:
        await asyncio.sleep(0.6)
        await nc.close()


def replies_refused(service: str, kind: str) -> float:
    """How many replies ``service`` has dropped for a reply subject outside the inboxes (``kind``:
    "request" or "discovery"), from its Prometheus counter."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("stablealign_replies_refused_total", {"service": service, "kind": kind}) or 0.0
