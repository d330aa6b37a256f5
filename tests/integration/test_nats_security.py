"""NATS with the generated users and permissions (stablealign/nats/permissions.py), on a real nats-server.

What a user would notice: a client without credentials, or with a wrong password, is refused at once
and told so (not "cannot reach NATS"), and the password shows up in no log line and no error; an
agent's or the CLI's credentials cannot publish a record or write the worlds bucket, so a forged
record never reaches `data build --nats`; TLS works with the CA that signed the server's
certificate and fails with another; and a whole world runs with one restricted user per service.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest

from services.trainer import streams as trainer_streams
from services.world import streams as world_streams
from services.world.client import WorldClient
from stablealign.core.config import env_name, load_settings
from stablealign.core.errors import ConfigError
from stablealign.nats import client as nats_client
from stablealign.nats import subjects
from stablealign.nats.auth import NatsClientOptions, NotAuthorizedError
from stablealign.nats.permissions import ROLES, ServerTls, new_password, render_config
from stablealign.serving.service import RunningService, start_service
from stablealign.v1 import common_pb2, trainer_pb2, world_pb2
from stablealign_app.natsserver import EmbeddedNatsServer
from tests.support.certs import make_certificates
from tests.support.replies import ask

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
HASHING = common_pb2.ModelRef(backend="offline", model="hashing")


class SecuredNats:
    """A nats-server with one user per role (random passwords) and, optionally, TLS on the client port."""

    def __init__(self, tmp_path: Path, tls: ServerTls | None = None) -> None:
        self.passwords = {role: new_password() for role in ROLES}
        self.server = EmbeddedNatsServer(
            store_dir=tmp_path / "nats", config=render_config(tls=tls), scheme="tls" if tls else "nats",
            env={ROLES[role].password_variable: password for role, password in self.passwords.items()})

    @property
    def url(self) -> str:
        return self.server.url

    def options(self, role: str, **tls: str) -> NatsClientOptions:
        """``role``'s client options, with the JetStream prefixes of the accounts it reads (``client_settings``)."""
        prefixes = {name.removeprefix("nats_"): value for name, value in ROLES[role].client_settings.items()}
        return NatsClientOptions.build(user=role, password=self.passwords[role], **prefixes, **tls)

    def settings(self, role: str) -> dict[str, str]:
        """The service settings (STABLEALIGN_NATS_*) of ``role``."""
        return {"nats_url": self.url, "nats_user": role, "nats_password": self.passwords[role],
                **ROLES[role].client_settings}


@pytest.fixture
def secured(tmp_path):
    nats_server = SecuredNats(tmp_path)
    nats_server.server.start()
    yield nats_server
    nats_server.server.stop()


def assert_no_secret(text: str, nats_server: SecuredNats) -> None:
    for password in nats_server.passwords.values():
        assert password not in text


def log_text(caplog) -> str:
    return "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)


# --- who may connect -------------------------------------------------------------------------------


async def test_a_client_without_credentials_is_refused_and_told_why(secured):
    started = time.monotonic()
    with pytest.raises(NotAuthorizedError) as refused:
        await nats_client.connect(secured.url, "anonymous", give_up_after=5.0)
    assert time.monotonic() - started < 3.0  # at once, not after the give-up time
    assert "refused the credentials (authorization violation)" in str(refused.value)
    assert "cannot reach" not in str(refused.value)
    with pytest.raises(NotAuthorizedError):  # a service (no give-up time) is refused at once too
        await asyncio.wait_for(nats_client.connect(secured.url, "anonymous-service"), timeout=5.0)


async def test_a_wrong_password_is_refused_and_never_shown(secured, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = secrets.token_urlsafe(12)
    with pytest.raises(NotAuthorizedError) as refused:
        await nats_client.connect(secured.url, "wrong", options=NatsClientOptions.build(user="agent", password=wrong),
                          give_up_after=5.0)
    host = secured.url.removeprefix("nats://")
    in_url = f"nats://agent:{wrong}@{host}"
    with pytest.raises(NotAuthorizedError) as refused_url:
        await nats_client.connect(in_url, "wrong-in-url", give_up_after=5.0)
    assert f"nats://***@{host}" in str(refused_url.value)
    for text in (str(refused.value), str(refused_url.value), log_text(caplog)):
        assert wrong not in text
        assert_no_secret(text, secured)
    nc = await nats_client.connect(f"nats://agent:{secured.passwords['agent']}@{host}", "right-in-url", give_up_after=5.0)
    await nc.close()


# --- what each role may do -------------------------------------------------------------------------


async def test_only_the_world_writes_records_and_the_worlds_bucket(secured, caplog):
    caplog.set_level(logging.ERROR, logger="stablealign.nats.client")
    world = await nats_client.connect(secured.url, "world", options=secured.options("world"), give_up_after=5.0)
    others = {role: await nats_client.connect(secured.url, role, options=secured.options(role), give_up_after=5.0)
              for role in ("agent", "observer", "cli", "trainer")}
    try:
        await world_streams.declare_streams(world.jetstream())
        record = common_pb2.InteractionRecord(world_id="w1", round=0, agent_id=0, question="forged?",
                                              draft_answer="a forged harmful answer")
        for nc in others.values():
            # A refused publish is dropped by the server: no acknowledgement comes (the wait is short here).
            js = nc.jetstream(timeout=0.3)
            with pytest.raises((nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError)):
                await js.publish("sandbox.records.w1", record.SerializeToString(), timeout=0.3,
                                 headers={subjects.MSG_ID_HEADER: "w1.0.0"})
            with pytest.raises((nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError)):
                await js.publish(f"$KV.{subjects.WORLDS_BUCKET}.w1", b"\x10\x02", timeout=0.3)  # state RUNNING
            for api in ("$JS.API", "$JS.WORLD.API"):  # nor delete the records stream, as its owner or a reader names it
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.request(f"{api}.STREAM.DELETE.{subjects.RECORDS_STREAM}", b"", timeout=0.3)
        info = await world.jetstream().stream_info(subjects.RECORDS_STREAM)
        assert info.state.messages == 0
        kv = await world.jetstream().key_value(subjects.WORLDS_BUCKET)
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get("w1")
        # Refused publishes are said, not silent: the client logs the server's permissions violation.
        denied = [r for r in caplog.records if r.getMessage() == "nats.permission_denied"]
        assert any("sandbox.records.w1" in r.error for r in denied), [r.__dict__ for r in denied]
        # The world itself may.
        ack = await world.jetstream().publish("sandbox.records.w1", record.SerializeToString(),
                                              headers={subjects.MSG_ID_HEADER: "w1.0.0"})
        assert ack.seq == 1
    finally:
        for nc in (world, *others.values()):
            await nc.close()


async def test_a_role_reads_only_its_own_reply_inboxes(secured, caplog):
    """An agent's credentials cannot subscribe to the CLI's reply inboxes, nor to every inbox (``_INBOX.>``),
    so the CLI's JetStream and API replies (records, world specs) stay the CLI's; the CLI still gets them."""
    caplog.set_level(logging.ERROR, logger="stablealign.nats.client")
    world = await nats_client.connect(secured.url, "world", options=secured.options("world"), give_up_after=5.0)
    cli = await nats_client.connect(secured.url, "cli", options=secured.options("cli"), give_up_after=5.0)
    spy = await nats_client.connect(secured.url, "spy", options=secured.options("agent"), give_up_after=5.0)
    try:
        await world_streams.declare_streams(world.jetstream())
        assert cli.new_inbox().startswith("_INBOX_cli.") and spy.new_inbox().startswith("_INBOX_agent.")
        overheard: list[str] = []

        async def overhear(msg) -> None:
            overheard.append(msg.subject)

        for subject in ("_INBOX.>", "_INBOX_cli.>", "*.>", ">"):
            await spy.subscribe(subject, cb=overhear)
        await spy.flush(timeout=2.0)
        # The CLI's reads: a JetStream API call and a batched direct get reply on its own inbox.
        info = await nats_client.jetstream(cli, "world", timeout=2.0).stream_info(subjects.RECORDS_STREAM)
        assert info.config.name == subjects.RECORDS_STREAM
        await world.jetstream().publish("sandbox.records.w1", b"r", headers={subjects.MSG_ID_HEADER: "w1.0.0"})
        read = await nats_client.read_subject(nats_client.jetstream(cli, "world", timeout=2.0), subjects.RECORDS_STREAM,
                                              "sandbox.records.w1")
        assert [(seq, msg.data) for seq, msg in read] == [(1, b"r")]
        await spy.flush(timeout=2.0)
        assert overheard == []
        refused = [text.lower() for text in denials(caplog)]  # nats-py lower-cases the server's error
        for subject in ("_INBOX.>", "_INBOX_cli.>", "*.>", ">"):
            assert f'error: nats: permissions violation for subscription to "{subject.lower()}"' in refused, refused
    finally:
        for nc in (spy, cli, world):
            await nc.close()


# --- TLS -------------------------------------------------------------------------------------------


async def test_tls_with_the_servers_ca_works_and_another_ca_fails(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    nats_server = SecuredNats(tmp_path, tls=ServerTls(str(certs.server_cert), str(certs.server_key)))
    with nats_server.server:
        nc = await nats_client.connect(nats_server.url, "tls", options=nats_server.options("cli", ca=str(certs.ca)),
                               give_up_after=5.0)
        assert nc.is_connected
        await nc.close()
        started = time.monotonic()
        with pytest.raises(ConfigError) as untrusted:
            await nats_client.connect(nats_server.url, "tls-other-ca",
                              options=nats_server.options("cli", ca=str(certs.other_ca)), give_up_after=5.0)
        assert time.monotonic() - started < 3.0
        assert "certificate is not trusted" in str(untrusted.value) and "STABLEALIGN_NATS_CA" in str(untrusted.value)


async def test_mutual_tls_needs_the_client_certificate(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    tls = ServerTls(str(certs.server_cert), str(certs.server_key), ca_file=str(certs.ca), verify=True)
    nats_server = SecuredNats(tmp_path, tls=tls)
    with nats_server.server:
        with pytest.raises((ConfigError, Exception)):
            await nats_client.connect(nats_server.url, "no-client-cert", options=nats_server.options("cli", ca=str(certs.ca)),
                              give_up_after=2.0)
        nc = await nats_client.connect(nats_server.url, "mtls", give_up_after=5.0, options=nats_server.options(
            "cli", ca=str(certs.ca), tls_cert=str(certs.client_cert), tls_key=str(certs.client_key)))
        await nc.close()


# --- a whole world with restricted users -------------------------------------------------------------


async def start(name: str, nats_server: SecuredNats) -> RunningService:
    module = importlib.import_module(f"services.{name}.main")
    values = {**nats_server.settings(name), "grpc_port": -1, "metrics_port": -1, "instance": f"secured-{name}"}
    return await start_service(name, load_settings(module.SETTINGS, values, environ={}), module.build)


def cli(args: list[str], nats_server: SecuredNats, role: str = "cli", password: str | None = None,
        ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STABLEALIGN_")}
    env.update(STABLEALIGN_NATS_URL=nats_server.url, STABLEALIGN_NATS_USER=role,
               STABLEALIGN_NATS_PASSWORD=nats_server.passwords[role] if password is None else password,
               **{env_name(setting): value for setting, value in ROLES[role].client_settings.items()})
    return subprocess.run([sys.executable, "-m", "stablealign_app.cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=45)


async def test_a_world_runs_with_one_restricted_user_per_service(secured, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    services = [await start(name, secured) for name in ("agent", "observer", "world", "trainer")]
    try:
        nc = await nats_client.connect(secured.url, "cli", options=secured.options("cli"), give_up_after=5.0)
        try:
            spec = world_pb2.WorldSpec(world_id="secured", size=2, rounds=1, seed=1, setting="half_half",
                                       prior_size=5, agent_model=common_pb2.ModelRef(backend="offline"),
                                       observer_model=common_pb2.ModelRef(backend="offline"), embedding_model=HASHING)
            worlds = WorldClient(nc)
            await worlds.create_world(spec)
            world = await worlds.wait_for_world("secured", timeout=30.0)
            assert world.state == world_pb2.WORLD_STATE_COMPLETED, world.error
            assert world.records_published == 4
            # Every step of the world ran within the permissions: no publish or subscribe was refused.
            assert not denials(caplog)
            # Discovery reaches every service from the CLI's account: the agent and the observer there, the world
            # and the trainer through its import of their $SRV subjects (one answer each, heartbeats aside).
            pings = await ask(nc, "$SRV.PING", expect=4)
            assert sorted(p["name"] for p in pings) == [f"stablealign-{s}" for s in ("agent", "observer", "trainer",
                                                                                        "world")]
            (info,) = await ask(nc, "$SRV.INFO.stablealign-world", expect=1)
            assert subjects.WORLD_GET in [e["subject"] for e in info["endpoints"]]
            # The agent's credentials cannot add a fifth record, even under a new message id.
            agent = await nats_client.connect(secured.url, "forger", options=secured.options("agent"), give_up_after=5.0)
            forged = common_pb2.InteractionRecord(world_id="secured", round=0, agent_id=3, question="q",
                                                  draft_answer="FORGED harmful answer",
                                                  revised_answer="FORGED harmful answer")
            with pytest.raises((nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError)):
                await agent.jetstream().publish("sandbox.records.secured", forged.SerializeToString(), timeout=1.0,
                                                headers={subjects.MSG_ID_HEADER: "forged.1"})
            await agent.close()
            assert denials(caplog) == ['Error: nats: permissions violation for publish to "sandbox.records.secured"']
            caplog.clear()
        finally:
            await nc.close()
        # A person's commands with the cli user: the records (and nothing forged) reach `data build`.
        out = tmp_path / "groups.jsonl"
        built = await asyncio.to_thread(cli, ["data", "build", "--world", "secured", "--out", str(out),
                                              ], secured)
        assert built.returncode == 0, built.stderr
        assert json.loads((tmp_path / "groups.stats.json").read_text())["records"] == 4
        assert "FORGED" not in out.read_text()
        listed = await asyncio.to_thread(cli, ["jobs", "list"], secured)
        assert listed.returncode == 0, listed.stderr
        wrong = secrets.token_urlsafe(12)
        refused = await asyncio.to_thread(cli, ["worlds", "list"], secured, password=wrong)
        assert refused.returncode == NotAuthorizedError.EXIT_CODE, refused.stderr
        assert "refused the credentials (authorization violation)" in refused.stderr
        for text in (built.stderr, built.stdout, listed.stderr, refused.stderr, log_text(caplog)):
            assert wrong not in text
            assert_no_secret(text, secured)
    finally:
        for service in reversed(services):
            await service.stop(grace=1.0)
    assert not denials(caplog)  # nor did the CLI's reads and calls, nor the drain


async def test_a_reader_reaches_each_owners_streams_under_its_prefix(secured):
    """The world's and the trainer's streams are in accounts of their own (issue 19): the CLI's user reads a job's
    log (`jobs logs`, which follows it until it has ended) and a world's spec from its bucket, with no service
    running, each through its account's JetStream prefix; without the prefixes ($JS.API) the same reads are refused."""
    world = await nats_client.connect(secured.url, "world", options=secured.options("world"), give_up_after=5.0)
    trainer = await nats_client.connect(secured.url, "trainer", options=secured.options("trainer"), give_up_after=5.0)
    cli_nc = await nats_client.connect(secured.url, "cli", options=secured.options("cli"), give_up_after=5.0)
    bare = await nats_client.connect(secured.url, "cli-bare", give_up_after=5.0, options=NatsClientOptions.build(
        user="cli", password=secured.passwords["cli"]))
    try:
        await world_streams.declare_streams(world.jetstream())
        await trainer_streams.declare_streams(trainer.jetstream())
        spec = world_pb2.WorldSpec(world_id="kept", size=3, rounds=2)
        worlds = await world.jetstream().key_value(subjects.WORLDS_BUCKET)
        await worlds.create("kept", world_pb2.World(spec=spec, state=world_pb2.WORLD_STATE_COMPLETED).SerializeToString())
        jobs = await trainer.jetstream().key_value(subjects.JOBS_BUCKET)
        job = trainer_pb2.Job(spec=trainer_pb2.JobSpec(job_id="job-kept"), state=trainer_pb2.JOB_STATE_SUCCEEDED)
        await jobs.create("job-kept", job.SerializeToString())
        line = trainer_pb2.LogLine(job_id="job-kept", line="the kept job's log line", time=1.0)
        await trainer.jetstream().publish(subjects.JOB_LOGS_SUBJECT.format(job_id="job-kept"), line.SerializeToString())
        assert await WorldClient(cli_nc).world_bounds("kept", timeout=0.2) == (3, 2)  # no world service: the bucket
        assert await WorldClient(bare).world_bounds("kept", timeout=0.2) is None  # $JS.API: refused
        with pytest.raises(nats.errors.TimeoutError):  # the server drops the denied publish: no answer
            await bare.jetstream(timeout=0.5).stream_info(subjects.JOB_LOGS_STREAM)
    finally:
        for nc in (bare, cli_nc, trainer, world):
            await nc.close()
    logs = await asyncio.to_thread(cli, ["jobs", "logs", "job-kept"], secured)
    assert logs.returncode == 0, logs.stderr
    assert "the kept job's log line" in logs.stdout


def test_an_embedded_run_ignores_nats_settings_meant_for_a_remote_server(tmp_path):
    """`stable-align run` without --nats, in a shell that exported the credentials and CA of a secured
    server: its own embedded server has no users and no TLS, so it runs without them and says so."""
    certs = make_certificates(tmp_path / "certs")
    password = new_password()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STABLEALIGN_")}
    env.update(STABLEALIGN_NATS_USER="cli", STABLEALIGN_NATS_PASSWORD=password, STABLEALIGN_NATS_CA=str(certs.ca))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "stablealign_app.cli.main", "run", "--size", "2", "--rounds", "1",
                             "--embedding-model", "hashing", "--prior-size", "5", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert len((out / "records.jsonl").read_text().splitlines()) == 4
    said = [line for line in result.stderr.splitlines() if "embedded.nats_settings_ignored" in line]
    assert len(said) == 1 and all(name in said[0] for name in (
        "STABLEALIGN_NATS_USER", "STABLEALIGN_NATS_PASSWORD", "STABLEALIGN_NATS_CA")), result.stderr
    assert password not in result.stderr + result.stdout


def denials(caplog) -> list[str]:
    return [r.__dict__.get("error") for r in caplog.records if r.getMessage() == "nats.permission_denied"]


async def test_service_ready_names_nats_without_the_password(secured, caplog):
    caplog.set_level(logging.INFO, logger="stablealign.serving.service")
    host = secured.url.removeprefix("nats://")
    module = importlib.import_module("services.observer.main")
    settings = load_settings(module.SETTINGS, {"nats_url": f"nats://observer:{secured.passwords['observer']}@{host}",
                                               "grpc_port": -1, "metrics_port": -1}, environ={})
    service = await start_service("observer", settings, module.build)
    await service.stop(grace=0.5)
    (ready,) = [r for r in caplog.records if r.getMessage() == "service.ready"]
    assert ready.nats == f"nats://***@{host}"
    assert_no_secret(log_text(caplog), secured)
