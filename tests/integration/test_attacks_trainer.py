"""Issue 19's routes against the trainer: every role on a real nats-server with the generated authorization block,
the real trainer service as its own restricted user, and its gRPC API on mutual TLS with the callers' table that
the gpu overlay deploys (``components/grpc-tls``), certificates made for the test.

What a user would notice: only the CLI's user reaches the trainer's subjects (the others are refused by the
server); a request naming a bucket's or a stream's subject as its reply changes nothing there (the CLI's user is in
the readers' account, so the server answers into that account, where no stream listens); a job's data, model or output
directory outside the configured roots (``..``, an absolute path, a symlink, a planted job directory) is
INVALID_ARGUMENT over NATS and gRPC alike; an oversized request is refused before it is read; a gRPC caller gets
only the methods its certificate's name is given. After each route the jobs bucket, the job logs, the worlds
bucket and the records are byte-identical. The table of routes is in ``docs/security-attacks.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats.errors
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.trainer import main as trainer_main
from stablealign.core.config import load_settings
from stablealign.core.errors import PayloadTooLargeError, ValidationError
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.serving.service import RunningService, start_service
from stablealign.v1 import trainer_pb2, trainer_pb2_grpc
from tests.integration.test_nats_security import SecuredNats
from tests.integration.test_trainer_service import write_groups
from tests.support.attacks import (
    JOB_OTHER,
    JOB_VICTIM,
    TARGETS,
    Owners,
    denials,
    refused_publish,
    replies_refused,
    send_misdirected,
)
from tests.support.certs import make_ca_with_clients

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
GRPC_TLS_PATCH = REPO / "deploy" / "k8s" / "components" / "grpc-tls" / "services-grpc-tls-patch.yaml"
MAX_REQUEST_BYTES = 64 * 1024
NOT_THE_TRAINERS = ("agent", "observer", "world")  # may not publish the trainer's subjects at all
PATH_PHRASE = "outside the allowed directories"


def deployed_method_callers() -> str:
    """The trainer's STABLEALIGN_GRPC_METHOD_CALLERS as the grpc-tls component sets it."""
    for doc in yaml.safe_load_all(GRPC_TLS_PATCH.read_text()):
        if doc and doc["metadata"]["name"] == "trainer":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            return next(e["value"] for e in container["env"] if e["name"] == "STABLEALIGN_GRPC_METHOD_CALLERS")
    raise AssertionError("no trainer in the grpc-tls component")


@dataclass
class Target:
    secured: SecuredNats
    service: RunningService
    owners: Owners
    root: Path  # the data and model root; <root>/out is the output root
    certs: Path
    valid: trainer_pb2.JobSpec  # inside the roots: a job the trainer would queue

    def channel(self, name: str | None) -> grpc.aio.Channel:
        """A TLS channel presenting ``name``'s client certificate (None: no client certificate)."""
        key = (self.certs / f"{name}.key").read_bytes() if name else None
        chain = (self.certs / f"{name}.crt").read_bytes() if name else None
        credentials = grpc.ssl_channel_credentials(root_certificates=(self.certs / "ca.crt").read_bytes(),
                                                   private_key=key, certificate_chain=chain)
        return grpc.aio.secure_channel(f"localhost:{self.service.grpc_port}", credentials)

    async def connect(self, role: str):
        return await nats_client.connect(self.secured.url, f"attacker-{role}", options=self.secured.options(role),
                                         give_up_after=5.0)


def _plant(tmp_path: Path) -> tuple[Path, trainer_pb2.JobSpec]:
    """The roots with a model and data inside, and links from inside to a model, data and a directory outside."""
    root, outside = tmp_path / "train", tmp_path / "outside"
    for folder in (root / "model", root / "out", outside / "model"):
        folder.mkdir(parents=True)
    data = write_groups(root / "data.jsonl")
    write_groups(outside / "data.jsonl")
    (root / "link.jsonl").symlink_to(outside / "data.jsonl")
    (root / "model-link").symlink_to(outside / "model")
    (root / "out" / "job-planted").symlink_to(outside)  # a job directory that is a link elsewhere
    return root, trainer_pb2.JobSpec(model=str(root / "model"), data=str(data), args={"max_steps": "1"})


@pytest.fixture
async def target(tmp_path):
    secured = SecuredNats(tmp_path)
    secured.server.start()
    owners = await Owners.connect(secured)
    await owners.declare()
    await owners.seed_worlds()
    root, valid = _plant(tmp_path)
    certs = make_ca_with_clients(tmp_path / "grpc", "operator", "viewer", "stranger")
    values = {**secured.settings("trainer"), "grpc_port": 0, "metrics_port": -1, "instance": "attacked-trainer",
              "runners": ("local",), "work_dir": str(root / "work"), "trainer_output_root": str(root / "out"),
              "trainer_data_roots": (str(root),), "trainer_model_roots": (str(root),), "poll_seconds": 0.2,
              "max_request_bytes": MAX_REQUEST_BYTES, "shutdown_grace_seconds": 2.0,
              "grpc_tls_cert": str(certs / "tls.crt"), "grpc_tls_key": str(certs / "tls.key"),
              "grpc_tls_client_ca": str(certs / "ca.crt"), "grpc_method_callers": deployed_method_callers()}
    service = await start_service("trainer", load_settings(trainer_main.SETTINGS, values, environ={}),
                                  trainer_main.build)
    scheduler = service.parts.background[0].__self__  # Scheduler.run
    while not scheduler._workers:  # start-up recovery done: a job seeded from now on is no scheduler's
        await asyncio.sleep(0.01)
    await owners.seed_jobs(valid)
    try:
        yield Target(secured, service, owners, root, certs, valid)
    finally:
        await owners.close()
        await service.stop(grace=2.0)
        secured.server.stop()



def submit(spec: trainer_pb2.JobSpec) -> bytes:
    return trainer_pb2.SubmitJobRequest(spec=spec).SerializeToString()


async def test_only_the_cli_reaches_the_trainers_subjects(target, caplog):
    """SubmitJob, CancelJob, GetJob and ListJobs as the agent, observer and world users: the server refuses each
    publish (no answer, a permissions violation); the victim job stays queued."""
    caplog.set_level(logging.ERROR, logger="stablealign.nats.client")
    before = await target.owners.state()
    requests = ((subjects.TRAINER_SUBMIT, submit(target.valid)),
                (subjects.TRAINER_CANCEL, trainer_pb2.CancelJobRequest(job_id=JOB_VICTIM).SerializeToString()),
                (subjects.TRAINER_GET, trainer_pb2.GetJobRequest(job_id=JOB_VICTIM).SerializeToString()),
                (subjects.TRAINER_LIST, b""))
    for role in NOT_THE_TRAINERS:
        nc = await target.connect(role)
        try:
            for subject, payload in requests:
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.request(subject, payload, timeout=0.3)
        finally:
            await nc.close()
    refusals = denials(caplog)
    for subject, _ in requests:
        assert sum(refused_publish(subject) in r for r in refusals) >= len(NOT_THE_TRAINERS), subject
    assert await target.owners.state() == before


def misdirected(valid: trainer_pb2.JobSpec) -> list[tuple[str, bytes, str]]:
    """Trainer requests whose reply subject is the victim job's entry, the victim world's or its records, or the
    JetStream API that the CLI's account imports. Each is one the CLI may send with a real inbox too, and none
    changes a job when served (the trainer serves the CLI's: an error, or a copy of a job, as its answer), so
    any change is the answer's landing."""
    kv_job, kv_world, records = TARGETS[2], TARGETS[0], TARGETS[1]
    get = trainer_pb2.GetJobRequest
    existing = trainer_pb2.JobSpec()
    existing.CopyFrom(valid)
    existing.job_id = JOB_OTHER
    return [
        (subjects.TRAINER_GET, get(job_id="job-unknown").SerializeToString(), kv_job),  # an error reply
        (subjects.TRAINER_GET, get(job_id=JOB_OTHER).SerializeToString(), kv_job),  # another job copied over it
        (subjects.TRAINER_GET, get(job_id=JOB_OTHER).SerializeToString(), kv_world),
        (subjects.TRAINER_LIST, b"", records),
        (subjects.TRAINER_LIST, b"", f"$JS.TRAINER.API.STREAM.PURGE.KV_{subjects.JOBS_BUCKET}"),
        (subjects.TRAINER_LIST, b"", f"$JS.WORLD.API.STREAM.PURGE.{subjects.RECORDS_STREAM}"),
        (subjects.TRAINER_SUBMIT, submit(existing), kv_job),  # a conflict: the job exists
        (subjects.TRAINER_CANCEL, trainer_pb2.CancelJobRequest(job_id=JOB_OTHER).SerializeToString(), kv_job),  # ended
        (subjects.TRAINER_GET, b"\xff\xff", kv_job),  # malformed
    ]


DISCOVERY = (("$SRV.PING", TARGETS[1]), ("$SRV.INFO.stablealign-trainer", TARGETS[2]),
             ("$SRV.STATS.stablealign-trainer", TARGETS[0]))


async def test_misdirected_trainer_replies_change_no_job_and_no_record(target, caplog):
    caplog.set_level(logging.WARNING)
    before = await target.owners.state()
    routes = misdirected(target.valid)
    counted = replies_refused("trainer", "request"), replies_refused("trainer", "discovery")
    for role in ("cli", *NOT_THE_TRAINERS):
        await send_misdirected(await target.connect(role), routes, DISCOVERY)
    assert await target.owners.state() == before
    # The other roles' sends the server refused. The CLI's crossed from the readers' account: the trainer got the
    # server's own reply subject and answered, into the forged subject of the CLI's account, where no stream
    # listens; it had nothing to drop.
    assert replies_refused("trainer", "request") == counted[0]
    assert replies_refused("trainer", "discovery") == counted[1]
    assert not [r for r in caplog.records if r.getMessage() in ("bus.reply_refused", "discovery.reply_refused")]
    refusals = denials(caplog)
    for subject in (subjects.TRAINER_GET, "$SRV.PING"):
        assert any(refused_publish(subject) in r for r in refusals), subject
    cli = await target.connect("cli")
    try:
        job = await nats_client.request(cli, subjects.TRAINER_GET, trainer_pb2.GetJobRequest(job_id=JOB_VICTIM),
                                        trainer_pb2.Job, timeout=5)
        assert job.state == trainer_pb2.JOB_STATE_QUEUED
        listed = await nats_client.request(cli, subjects.TRAINER_LIST, trainer_pb2.ListJobsRequest(),
                                           trainer_pb2.ListJobsResponse, timeout=5)
        assert sorted(j.spec.job_id for j in listed.jobs) == [JOB_OTHER, JOB_VICTIM]
    finally:
        await cli.close()


def outside_paths(target: Target) -> dict[str, trainer_pb2.JobSpec]:
    """One job per way out of the roots, each otherwise valid; the key's first word is the field refused."""
    root, outside = target.root, target.root.parent / "outside"

    def spec(**fields) -> trainer_pb2.JobSpec:
        out = trainer_pb2.JobSpec()
        out.CopyFrom(target.valid)
        for name, value in fields.items():
            setattr(out, name, value)
        return out

    return {
        "data ..": spec(data=str(root / ".." / "outside" / "data.jsonl")),
        "data absolute": spec(data="/etc/passwd"),
        "data symlink": spec(data=str(root / "link.jsonl")),
        "model ..": spec(model=str(root / "model" / ".." / ".." / "outside" / "model")),
        "model absolute": spec(model=str(outside / "model")),
        "model symlink": spec(model=str(root / "model-link")),
        "output_dir ..": spec(output_dir="../../../outside"),
        "output_dir absolute": spec(output_dir=str(outside)),
        "output_dir symlink": spec(job_id="job-planted"),  # its own directory is a link out of the root
        "output_dir of another job": spec(output_dir=str(root / "out" / JOB_VICTIM)),
    }


async def test_paths_outside_the_roots_are_refused_over_nats_and_grpc(target):
    before = await target.owners.state()
    cli = await target.connect("cli")
    try:
        async with target.channel("operator") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            for what, spec in outside_paths(target).items():
                field = what.split()[0]
                with pytest.raises(ValidationError, match=f"^{field}") as over_nats:
                    await nats_client.request(cli, subjects.TRAINER_SUBMIT, trainer_pb2.SubmitJobRequest(spec=spec),
                                              trainer_pb2.Job, timeout=5, attempts=1)
                assert PATH_PHRASE in str(over_nats.value), what
                with pytest.raises(grpc.aio.AioRpcError) as over_grpc:
                    await stub.SubmitJob(trainer_pb2.SubmitJobRequest(spec=spec), timeout=5)
                assert over_grpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
                assert over_grpc.value.details().startswith(field) and PATH_PHRASE in over_grpc.value.details(), what
    finally:
        await cli.close()
    assert await target.owners.state() == before


async def test_an_oversized_request_is_refused_before_it_is_read(target):
    before = await target.owners.state()
    big = trainer_pb2.JobSpec()
    big.CopyFrom(target.valid)
    big.args["lr"] = "1" * (2 * MAX_REQUEST_BYTES)
    cli = await target.connect("cli")
    try:
        refused = await asyncio.gather(*(
            nats_client.request(cli, subjects.TRAINER_SUBMIT, trainer_pb2.SubmitJobRequest(spec=big), trainer_pb2.Job,
                                timeout=5, attempts=1) for _ in range(10)), return_exceptions=True)
        assert all(isinstance(r, PayloadTooLargeError) for r in refused), refused
        async with target.channel("operator") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as over_grpc:
                await trainer_pb2_grpc.TrainerServiceStub(channel).SubmitJob(trainer_pb2.SubmitJobRequest(spec=big),
                                                                             timeout=5)
            assert over_grpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await cli.close()
    assert await target.owners.state() == before


async def test_grpc_callers_get_only_the_methods_their_certificate_is_given(target):
    """The deployed table: operator submits and cancels, viewer only reads, any other name nothing; a caller
    without a client certificate does not get through the handshake; health stays open to the CA's certificates."""
    before = await target.owners.state()
    assert json.loads(deployed_method_callers())["SubmitJob"] == ["operator"]
    submit_job = trainer_pb2.SubmitJobRequest(spec=target.valid)
    cancel = trainer_pb2.CancelJobRequest(job_id=JOB_VICTIM)
    for name in ("viewer", "stranger"):
        async with target.channel(name) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            calls = [stub.SubmitJob(submit_job, timeout=5), stub.CancelJob(cancel, timeout=5)]
            if name == "stranger":
                calls.append(stub.GetJob(trainer_pb2.GetJobRequest(job_id=JOB_VICTIM), timeout=5))
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            if name == "viewer":
                job = await stub.GetJob(trainer_pb2.GetJobRequest(job_id=JOB_VICTIM), timeout=5)
                assert job.state == trainer_pb2.JOB_STATE_QUEUED
    async with target.channel(None) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await trainer_pb2_grpc.TrainerServiceStub(anonymous).SubmitJob(submit_job, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(f"127.0.0.1:{target.service.grpc_port}") as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await trainer_pb2_grpc.TrainerServiceStub(plaintext).CancelJob(cancel, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await target.owners.state() == before
