"""The NATS permissions table, its generated server configuration and the k8s manifests that use it.

What an operator would notice: the committed ``deploy/k8s/base/nats-auth.conf`` is what the table
generates (``make nats-config``) and nats-server accepts it; the table keeps every write of records,
memories and world state with the world; every service Deployment connects as its own user with
the password of the Secret that NATS reads it from.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from stablealign.core.errors import ConfigError
from stablealign.nats import subjects
from stablealign.nats.auth import NatsClientOptions
from stablealign.nats.permissions import (
    ACCOUNT_STREAMS,
    ACCOUNTS,
    CLIENTS_ACCOUNT,
    JS_API_ALL,
    ROLES,
    TRAINER_ACCOUNT,
    WORLD_ACCOUNT,
    ServerTls,
    check_password,
    crossing,
    exports,
    imports,
    main,
    new_password,
    render_authorization,
    render_config,
    subject_covers,
    subjects_overlap,
)
from stablealign_app.natsserver import find_nats_server

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy" / "k8s" / "base"
SERVICES = ("agent", "observer", "world", "trainer")


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more at the end."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def may_publish(role: str, subject: str) -> bool:
    return any(matches(pattern, subject) for pattern in ROLES[role].publish)


def test_the_committed_server_configuration_is_the_generated_one():
    committed = (BASE / "nats-auth.conf").read_text()
    assert committed == render_authorization(), "stale: run `make nats-config`"


def test_nats_server_accepts_the_generated_configuration(tmp_path):
    from tests.support.certs import make_certificates

    certs = make_certificates(tmp_path / "certs")
    tls = ServerTls(str(certs.server_cert), str(certs.server_key), ca_file=str(certs.ca), verify=True)
    conf = tmp_path / "nats.conf"
    conf.write_text(render_config(tls=tls))
    env = {role.password_variable: new_password() for role in ROLES.values()}
    result = subprocess.run([find_nats_server(), "-c", str(conf), "-t"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    missing = subprocess.run([find_nats_server(), "-c", str(conf), "-t"], env={}, capture_output=True, text=True,
                             timeout=30)
    assert missing.returncode != 0 and "NATS_WORLD_PASSWORD" in missing.stderr + missing.stdout


def test_only_the_world_writes_records_memories_and_world_state():
    writes = ["sandbox.records.w1", "sandbox.memory.w1.0", "sandbox.pools.abc.0", f"$KV.{subjects.WORLDS_BUCKET}.w1",
              f"$JS.API.STREAM.CREATE.{subjects.RECORDS_STREAM}", f"$JS.API.STREAM.UPDATE.{subjects.RECORDS_STREAM}",
              f"$JS.API.STREAM.DELETE.{subjects.RECORDS_STREAM}", f"$JS.API.STREAM.PURGE.{subjects.RECORDS_STREAM}",
              f"$JS.API.STREAM.MSG.DELETE.{subjects.RECORDS_STREAM}", f"$JS.API.STREAM.CREATE.KV_{subjects.WORLDS_BUCKET}"]
    for subject in writes:
        allowed = {role for role in ROLES if may_publish(role, subject)}
        assert allowed <= {"world"}, (subject, allowed)
    for subject in writes[:5]:
        assert may_publish("world", subject), subject
    # Nobody deletes or purges a stream through these users.
    assert not any(may_publish(role, f"$JS.API.STREAM.DELETE.{subjects.RECORDS_STREAM}") for role in ROLES)


def test_agents_and_observers_only_answer_their_own_subjects():
    assert ROLES["agent"].responds and ROLES["observer"].responds and not ROLES["cli"].responds
    for role, own in (("agent", subjects.AGENT_DRAFT), ("observer", subjects.OBSERVER_RATE)):
        assert own in ROLES[role].subscribe
        for subject in (subjects.AGENT_DRAFT, subjects.OBSERVER_RATE, subjects.WORLD_CREATE, subjects.TRAINER_SUBMIT):
            assert not may_publish(role, subject), (role, subject)  # they send no requests
        assert not any(matches(p, subjects.WORLD_CREATE) for p in ROLES[role].subscribe)
    assert not any(matches(p, subjects.AGENT_DRAFT) for p in ROLES["observer"].subscribe)


def test_the_cli_reads_records_and_calls_the_apis_the_trainer_keeps_to_trainer():
    for subject in (subjects.WORLD_CREATE, subjects.WORLD_RESUME, subjects.TRAINER_SUBMIT, subjects.TRAINER_LIST,
                    f"$JS.WORLD.API.DIRECT.GET.{subjects.RECORDS_STREAM}",
                    f"$JS.TRAINER.API.STREAM.MSG.GET.{subjects.JOB_LOGS_STREAM}"):
        assert may_publish("cli", subject), subject
    # Each stream only under its own account's prefix, never as $JS.API (the cli's account has no JetStream).
    for subject in (f"$JS.API.DIRECT.GET.{subjects.RECORDS_STREAM}", f"$JS.TRAINER.API.DIRECT.GET.{subjects.RECORDS_STREAM}",
                    f"$JS.WORLD.API.STREAM.INFO.{subjects.JOB_LOGS_STREAM}"):
        assert not may_publish("cli", subject), subject
    for subject in ("trainer.jobs.j1.log", subjects.AGENT_DRAFT, "sandbox.records.w1"):
        assert not may_publish("cli", subject), subject
    trainer_writes = [p for p in ROLES["trainer"].publish if not p.startswith(("$JS.", "$KV."))]
    assert trainer_writes == ["trainer.>"]
    assert not may_publish("trainer", "sandbox.records.w1")


def test_readers_create_no_consumer_and_owners_only_on_their_own_bucket():
    """A consumer's deliver subject is out of a permission's sight (issue 19): the roles that read get none,
    the world and the trainer one kind, on the bucket they own, which they list with nats-py's watch."""
    streams = (subjects.RECORDS_STREAM, subjects.MEMORY_STREAM, subjects.POOL_STREAM, subjects.JOB_LOGS_STREAM,
               f"KV_{subjects.WORLDS_BUCKET}", f"KV_{subjects.JOBS_BUCKET}")
    creates = [f"$JS.API.CONSUMER.CREATE.{s}{tail}" for s in streams for tail in ("", ".spy", ".spy.x.>")]
    imported = [c.replace("$JS.API.", f"$JS.{account}.API.") for c in creates for account in ACCOUNT_STREAMS]
    for name in ("cli", "agent", "observer"):
        assert not any(may_publish(name, s) or "CONSUMER" in p for s in creates + imported
                       for p in ROLES[name].publish), name
        assert all(denies(name, s) for s in creates + imported), name
    for name, own in (("world", f"KV_{subjects.WORLDS_BUCKET}"), ("trainer", f"KV_{subjects.JOBS_BUCKET}")):
        allowed = {s for s in creates if may_publish(name, s)}
        assert allowed == {s for s in creates if s.split(".")[4] == own}, name
        assert all(denies(name, s) for s in creates if s not in allowed), name


def test_each_writer_of_streams_has_an_account_of_its_own():
    """Issue 19: a JetStream answer goes to whatever reply subject its request names, so the world and the trainer
    each keep their streams in an account of their own (neither's reads can have an answer written into the
    other's), and the users that only read are in a third, without JetStream."""
    assert {r.name: r.account for r in ROLES.values()} == {
        "world": WORLD_ACCOUNT, "trainer": TRAINER_ACCOUNT, "agent": CLIENTS_ACCOUNT, "observer": CLIENTS_ACCOUNT,
        "cli": CLIENTS_ACCOUNT}
    assert set(ACCOUNT_STREAMS[WORLD_ACCOUNT]) == {subjects.RECORDS_STREAM, subjects.MEMORY_STREAM, subjects.POOL_STREAM,
                                                  f"KV_{subjects.WORLDS_BUCKET}"}
    assert set(ACCOUNT_STREAMS[TRAINER_ACCOUNT]) == {subjects.JOB_LOGS_STREAM, f"KV_{subjects.JOBS_BUCKET}"}
    for name, account in (("world", WORLD_ACCOUNT), ("trainer", TRAINER_ACCOUNT)):
        # An owner calls its own account's JetStream as $JS.API, and names no stream of another account there.
        others = [s for a, streams in ACCOUNT_STREAMS.items() if a != account for s in streams]
        api = [p for p in ROLES[name].publish if p.startswith("$JS.")]
        assert api and not any(p.startswith(("$JS.WORLD.", "$JS.TRAINER.")) for p in api), name
        assert not any(stream in p.split(".") for p in api for stream in others), name
    text = render_authorization()
    assert text.count("jetstream: enabled") == 2 and "jetstream" not in text.split(f"  {CLIENTS_ACCOUNT} {{")[1]


def test_readers_connect_with_the_prefix_of_each_account_they_read():
    """What a reader's client must set to reach a JetStream account (``Role.client_settings``), and nothing for
    an owner, which calls its own as $JS.API."""
    assert ROLES["cli"].client_settings == {"nats_world_js_prefix": "$JS.WORLD.API",
                                            "nats_trainer_js_prefix": "$JS.TRAINER.API"}
    assert ROLES["agent"].client_settings == ROLES["observer"].client_settings == {
        "nats_world_js_prefix": "$JS.WORLD.API"}
    assert ROLES["world"].client_settings == ROLES["trainer"].client_settings == {}
    options = NatsClientOptions.build(user="cli", **{k.removeprefix("nats_"): v for k, v in ROLES["cli"].client_settings.items()})
    assert (options.jetstream_prefix("world"), options.jetstream_prefix("trainer")) == ("$JS.WORLD.API", "$JS.TRAINER.API")
    assert NatsClientOptions().jetstream_prefix("trainer") == "$JS.API"  # an unsecured server's
    with pytest.raises(ConfigError, match="STABLEALIGN_NATS_WORLD_JS_PREFIX"):
        NatsClientOptions.build(world_js_prefix="$JS.WORLD.>")


def test_only_services_and_the_read_api_cross_between_the_accounts():
    """What crosses is imported as a service, so its answers go back to the asker's account: the APIs of the world,
    the trainer, the agents and the observers, discovery, and each JetStream account's API (whole, under its own
    prefix: what a reader may call of it is its permissions'). No subject of a stream or bucket crosses, and
    nothing between the world's and the trainer's accounts."""
    data = ("sandbox.records.>", "sandbox.memory.>", "sandbox.pools.>", "$KV.>", subjects.JOB_LOGS_SUBJECT.format(job_id="*"))
    for source in ACCOUNTS:
        for target in ACCOUNTS:
            if source == target:
                continue
            for subject in crossing(source, target):
                assert not any(subjects_overlap(subject, d) for d in data), (source, target, subject)
                assert (subject, (target,)) in exports(source) or target in dict(exports(source))[subject]
                assert any(i[:2] == (source, subject) for i in imports(target))
    assert crossing(WORLD_ACCOUNT, TRAINER_ACCOUNT) == crossing(TRAINER_ACCOUNT, WORLD_ACCOUNT) == ()
    for account in (WORLD_ACCOUNT, TRAINER_ACCOUNT):
        assert (account, JS_API_ALL, f"$JS.{account}.API.>") in imports(CLIENTS_ACCOUNT)
        assert (account, "$SRV.*", "$SRV.*") in imports(CLIENTS_ACCOUNT)  # one $SRV.PING reaches both
        assert dict(exports(account))[JS_API_ALL] == (CLIENTS_ACCOUNT,)
    assert (WORLD_ACCOUNT, subjects.WORLD_GET, subjects.WORLD_GET) in imports(CLIENTS_ACCOUNT)
    assert (TRAINER_ACCOUNT, subjects.TRAINER_SUBMIT, subjects.TRAINER_SUBMIT) in imports(CLIENTS_ACCOUNT)
    assert (CLIENTS_ACCOUNT, *[subjects.batch_subject(subjects.OBSERVER_RATE)] * 2) in imports(WORLD_ACCOUNT)
    # The world only asks: nothing of the readers' account but the agents' and observers' requests reaches it.
    assert {s for _, s, _ in imports(WORLD_ACCOUNT)} == {s for s, _ in exports(CLIENTS_ACCOUNT)} == {
        s for r in ("agent", "observer") for s in ROLES[r].subscribe if s.startswith(("sandbox.agent.", "sandbox.observer."))}
    assert imports(TRAINER_ACCOUNT) == ()


def test_subject_overlap_and_cover():
    assert subjects_overlap("$KV.>", "$KV.SANDBOX_WORLDS.>") and subjects_overlap("a.*.c", "a.b.*")
    assert not subjects_overlap("a.b", "a.b.>") and not subjects_overlap("a.*", "b.*")
    assert subjects_overlap("trainer.>", "trainer.jobs.*.log") and not subjects_overlap("a.b.c", "a.b")
    assert subject_covers("$KV.>", "$KV.X.>") and subject_covers("a.*", "a.b") and not subject_covers("a.b", "a.*")
    assert not subject_covers("a.*", "a.>") and not subject_covers("a.>", "a")


def denies(role: str, subject: str) -> bool:
    return any(matches(pattern, subject) for pattern in ROLES[role].publish_deny)


def test_every_role_is_denied_what_it_does_not_own_and_nothing_it_needs():
    """The deny lists never meet the allow lists (the server would refuse what a service needs: deny wins), and
    they name the buckets, streams and JetStream writes outside each role's own."""
    for name, role in ROLES.items():
        clash = [(d, a) for d in role.publish_deny for a in role.publish if subjects_overlap(d, a)]
        assert clash == [], name
        assert denies(name, f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.RECORDS_STREAM}.spy"), name
        assert denies(name, f"$JS.API.STREAM.DELETE.{subjects.RECORDS_STREAM}"), name
        assert denies(name, f"$JS.API.STREAM.PURGE.KV_{subjects.WORLDS_BUCKET}"), name
    for name in ("agent", "observer", "cli"):
        for subject in (f"$KV.{subjects.WORLDS_BUCKET}.w1", f"$KV.{subjects.JOBS_BUCKET}.j1", "$KV.OTHER.x",
                        "sandbox.records.w1", "sandbox.memory.w1.0", "sandbox.pools.p", "trainer.jobs.j1.log",
                        f"$JS.API.STREAM.CREATE.{subjects.RECORDS_STREAM}", "$JS.API.STREAM.UPDATE.ANY",
                        f"$JS.WORLD.API.STREAM.CREATE.{subjects.RECORDS_STREAM}", "$JS.WORLD.API.STREAM.UPDATE.ANY",
                        f"$JS.TRAINER.API.STREAM.PURGE.{subjects.JOB_LOGS_STREAM}",
                        f"$JS.WORLD.API.CONSUMER.DURABLE.CREATE.{subjects.RECORDS_STREAM}.spy"):
            assert denies(name, subject), (name, subject)
    for name in ("world", "trainer"):  # their own account's JetStream is $JS.API: no import prefix means anything
        assert denies(name, "$JS.WORLD.API.STREAM.INFO.X") and denies(name, "$JS.TRAINER.API.STREAM.INFO.X")
    assert denies("world", f"$KV.{subjects.JOBS_BUCKET}.j1") and denies("world", "trainer.jobs.j1.log")
    assert denies("world", f"$JS.API.STREAM.CREATE.{subjects.JOB_LOGS_STREAM}")
    assert not denies("world", f"$KV.{subjects.WORLDS_BUCKET}.w1") and not denies("world", "sandbox.records.w1")
    assert denies("trainer", f"$KV.{subjects.WORLDS_BUCKET}.w1") and denies("trainer", "sandbox.records.w1")
    assert not denies("trainer", f"$KV.{subjects.JOBS_BUCKET}.j1")


def test_each_role_subscribes_only_its_own_reply_inboxes():
    """The prefix a role's client connects with (natsauth) is the only inbox the server lets it read."""
    for name, role in ROLES.items():
        prefix = NatsClientOptions.build(user=name, password="p" * 16).reply_inbox_prefix()
        assert prefix == f"_INBOX_{name}"
        inboxes = [s for s in role.subscribe if s.startswith("_INBOX")]
        assert inboxes == [f"{prefix}.>"], name
        assert not any(matches(pattern, f"_INBOX_{other}.x.1") for other in ROLES if other != name
                       for pattern in role.subscribe), name
        assert not any(matches(pattern, "_INBOX.x.1") for pattern in role.subscribe), name


def test_the_inbox_prefix_of_a_client():
    assert NatsClientOptions().reply_inbox_prefix() == "_INBOX"  # no user: nats-py's own
    assert NatsClientOptions().reply_inbox_prefix("nats://agent:pw@127.0.0.1:4222") == "_INBOX_agent"
    assert NatsClientOptions.build(user="cli", inbox_prefix="_INBOX").reply_inbox_prefix() == "_INBOX"
    assert NatsClientOptions.build(user="cli").connect_kwargs()["inbox_prefix"] == "_INBOX_cli"
    for bad in ("_INBOX.>", "a b", "x.", "*"):
        with pytest.raises(ConfigError, match="STABLEALIGN_NATS_INBOX_PREFIX"):
            NatsClientOptions.build(user="cli", inbox_prefix=bad)
    with pytest.raises(ConfigError, match="STABLEALIGN_NATS_USER"):
        NatsClientOptions.build(user="a*b")


def test_passwords_and_unknown_roles():
    password = new_password()
    check_password("world", password)
    for bad in ("12345678901234567890", "short", "has#comment-and-dash-1234"):
        with pytest.raises(ValueError):
            check_password("world", bad)
    with pytest.raises(ValueError, match="unknown roles"):
        render_authorization({"admin": password})
    text = render_authorization({"cli": password})
    assert f'password: "{password}"' in text and "password: $NATS_WORLD_PASSWORD" in text


def test_the_command_writes_the_file_and_refuses_half_a_tls_setting(tmp_path, capsys):
    out = tmp_path / "auth.conf"
    assert main(["--out", str(out)]) == 0
    assert out.read_text() == render_authorization()
    with pytest.raises(SystemExit):
        main(["--tls-cert", "c.pem"])
    assert main(["--new-passwords"]) == 0
    lines = capsys.readouterr().out.split()
    assert sorted(line.split("=")[0] for line in lines) == sorted(ROLES)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((BASE / name).read_text()) if d]


def _container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def test_every_service_connects_as_its_own_user_with_the_secrets_password():
    for name in SERVICES:
        (deployment,) = [d for d in _docs(f"{name}.yaml") if d["kind"] == "Deployment"]
        env = {e["name"]: e for e in _container(deployment)["env"]}
        assert env["STABLEALIGN_NATS_USER"]["value"] == name
        # A reader's JetStream prefixes, as its role says (the agents and observers read the world's streams).
        prefixes = {k.removeprefix("STABLEALIGN_").lower(): e["value"] for k, e in env.items() if k.endswith("_JS_PREFIX")}
        assert prefixes == ROLES[name].client_settings, name
        # components/nats-tls replaces the first variable with tls://: it must stay the URL.
        assert _container(deployment)["env"][0]["name"] == "STABLEALIGN_NATS_URL"
        assert env["STABLEALIGN_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "nats-credentials",
                                                                                  "key": name}
    (nats,) = [d for d in _docs("nats.yaml") if d["kind"] == "StatefulSet"]
    env = {e["name"]: e for e in _container(nats)["env"]}
    for role in ROLES.values():
        assert env[role.password_variable]["valueFrom"]["secretKeyRef"] == {"name": "nats-credentials",
                                                                            "key": role.name}
    (config,) = [d for d in _docs("nats.yaml") if d["kind"] == "ConfigMap"]
    assert "include ./auth.conf" in config["data"]["nats.conf"]
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (generated,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "nats-auth"]
    assert "auth.conf=nats-auth.conf" in generated["files"]


def test_the_tls_component_mounts_what_its_config_names():
    component = REPO / "deploy" / "k8s" / "components" / "nats-tls"
    tls = (component / "tls.conf").read_text()
    patch = yaml.safe_load((component / "nats-tls-patch.yaml").read_text())
    (mount,) = _container(patch)["volumeMounts"]
    assert f'cert_file: "{mount["mountPath"]}/tls.crt"' in tls and f'key_file: "{mount["mountPath"]}/tls.key"' in tls
    for deployment in yaml.safe_load_all((component / "services-tls-patch.yaml").read_text()):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        values = {env["name"]: env.get("value") for env in container["env"]}
        assert values == {"STABLEALIGN_NATS_URL": "tls://nats:4222", "STABLEALIGN_NATS_CA": "/etc/nats-ca/ca.crt"}
