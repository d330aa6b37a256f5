"""One environment-variable rule for every flag of every `stable-align` command (docs/cli.md).

The rule, computed here independently of ``stablealign_app.cli.rules``:

- shared: ``--nats`` -> ``STABLEALIGN_NATS_URL``, ``--log-level`` -> ``STABLEALIGN_LOG_LEVEL``,
  ``--log-format`` -> ``STABLEALIGN_LOG_FORMAT``;
- ``serve``: ``STABLEALIGN_<FLAG>``, the names the services' settings read;
- every other command path CMD: ``STABLEALIGN_<CMD>_<FLAG>``.

The tree walk checks every option; then every command is run (CliRunner, its work replaced by a
recorder) with the variable of one of its options set, to see that the command gets the value, and
for most of them that a flag wins over it and that the old shared names change nothing.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from stablealign.core.errors import StableAlignError
from stablealign.serving.settings import ServiceSettings
from stablealign_app.cli.main import app
from tests.support.cli import clean_env, restore_logging  # noqa: F401 (autouse fixtures)

pytestmark = pytest.mark.timeout(120)

SHARED = {"--nats": "STABLEALIGN_NATS_URL", "--log-level": "STABLEALIGN_LOG_LEVEL",
          "--log-format": "STABLEALIGN_LOG_FORMAT",
          # NATS credentials and TLS: every command that connects has them, named as the service settings.
          "--nats-user": "STABLEALIGN_NATS_USER", "--nats-password": "STABLEALIGN_NATS_PASSWORD",
          "--nats-password-file": "STABLEALIGN_NATS_PASSWORD_FILE", "--nats-creds": "STABLEALIGN_NATS_CREDS",
          "--nats-ca": "STABLEALIGN_NATS_CA", "--nats-tls-cert": "STABLEALIGN_NATS_TLS_CERT",
          "--nats-tls-key": "STABLEALIGN_NATS_TLS_KEY", "--nats-inbox-prefix": "STABLEALIGN_NATS_INBOX_PREFIX",
          "--nats-world-js-prefix": "STABLEALIGN_NATS_WORLD_JS_PREFIX",
          "--nats-trainer-js-prefix": "STABLEALIGN_NATS_TRAINER_JS_PREFIX"}
# Every command a person can run; the tree must hold at least these.
COMMANDS = {"serve", "run", "watch", "export", "worlds list", "worlds show", "data build", "train", "eval",
            "generate", "model pull", "model init-tiny", "jobs submit", "jobs list", "jobs show", "jobs logs",
            "jobs cancel", "pipeline"}


def expected_env(path: tuple[str, ...], opts: list[str]) -> str:
    longs = [o for o in opts if o.startswith("--")]
    flag = "--nats" if "--nats" in longs else longs[0]
    if flag in SHARED:
        return SHARED[flag]
    words = [flag[2:]] if path[:1] == ("serve",) else [*path, flag[2:]]
    return "STABLEALIGN_" + "_".join(words).replace("-", "_").replace(" ", "_").upper()


def walk(command: Any, path: tuple[str, ...] = ()):
    yield path, command
    for name, sub in (getattr(command, "commands", None) or {}).items():
        yield from walk(sub, (*path, name))


def options(command: Any) -> list[Any]:
    return [p for p in command.params if getattr(p, "param_type_name", "") == "option" and p.name != "help"]




def invoke(args: list[str], **env: str):
    return CliRunner().invoke(app, args, env=env, catch_exceptions=False)


# --- the tree ---------------------------------------------------------------------------------------


def test_every_option_of_every_command_has_the_rules_variable():
    tree = dict(walk(typer.main.get_command(app)))
    leaves = {" ".join(path) for path, command in tree.items() if path and not getattr(command, "commands", None)}
    assert COMMANDS <= leaves, COMMANDS - leaves
    checked = 0
    for path, command in tree.items():
        for option in options(command):
            assert option.envvar == expected_env(path, option.opts), (path, option.opts, option.envvar)
            assert option.show_envvar, (path, option.opts)
            checked += 1
    assert checked > 100  # the walk saw the whole tree (the train options alone are dozens)


def test_examples_from_the_readme():
    tree = dict(walk(typer.main.get_command(app)))

    def env(path: str, flag: str) -> str:
        (option,) = [o for o in options(tree[tuple(path.split())]) if flag in o.opts]
        return option.envvar

    assert env("run", "--seed") == "STABLEALIGN_RUN_SEED"
    assert env("data build", "--out") == "STABLEALIGN_DATA_BUILD_OUT"
    assert env("jobs submit", "--model") == "STABLEALIGN_JOBS_SUBMIT_MODEL"
    assert env("train", "--learning-rate") == env("train", "--lr") == "STABLEALIGN_TRAIN_LEARNING_RATE"
    assert env("serve", "--grpc-port") == "STABLEALIGN_GRPC_PORT"
    assert env("serve", "--metrics-port") == "STABLEALIGN_METRICS_PORT"
    for path in ("run", "worlds list", "jobs cancel", "data build", "serve", "train"):
        assert env(path, "--nats") == "STABLEALIGN_NATS_URL"
    for path in ("run", "pipeline", "eval", "serve"):
        assert env(path, "--log-level") == "STABLEALIGN_LOG_LEVEL"
        assert env(path, "--log-format") == "STABLEALIGN_LOG_FORMAT"


def test_no_two_commands_share_a_variable_except_the_shared_ones():
    users: dict[str, set[str]] = defaultdict(set)
    for path, command in walk(typer.main.get_command(app)):
        names = [option.envvar for option in options(command)]
        assert len(names) == len(set(names)), (path, names)  # nor two options of one command
        for name in names:
            users[name].add(" ".join(path))
    shared = {name: where for name, where in users.items() if len(where) > 1}
    assert set(shared) <= set(SHARED.values()), shared


def test_serve_reads_the_names_the_services_settings_read():
    serve = typer.main.get_command(app).commands["serve"]
    names = (list(ServiceSettings.model_fields) if hasattr(ServiceSettings, "model_fields")
             else [f.name for f in dataclasses.fields(ServiceSettings)])
    settings = {"STABLEALIGN_" + name.upper() for name in names}
    for option in options(serve):
        assert option.envvar in settings, (option.opts, option.envvar)


# --- each command sees its variable -----------------------------------------------------------------


class Stop(StableAlignError):
    """Raised by a recorder to end a command once it has shown what it was given."""


def test_run(monkeypatch, tmp_path):
    from stablealign_app.cli import sandbox

    seen: list[Any] = []

    async def run_world(spec, out, nats_url, timeout, quiet=False, workers=-1):
        seen.append((spec, out, nats_url, workers))
        raise Stop("recorded")

    monkeypatch.setattr(sandbox, "run_world", run_world)
    out = str(tmp_path / "o")
    assert invoke(["run", "--out", out], STABLEALIGN_RUN_SEED="7", STABLEALIGN_RUN_SIZE="2").exit_code == 1
    assert (seen[-1][0].seed, seen[-1][0].size) == (7, 2)
    assert invoke(["run", "--out", out, "--seed", "3"], STABLEALIGN_RUN_SEED="7").exit_code == 1
    assert seen[-1][0].seed == 3  # flags win
    # The names one command used to share with others change nothing now.
    invoke(["run", "--out", out], STABLEALIGN_SEED="9", STABLEALIGN_SIZE="5", STABLEALIGN_OUT="/elsewhere")
    assert (seen[-1][0].seed, seen[-1][0].size, str(seen[-1][1])) == (1, 3, out)
    invoke(["run"], STABLEALIGN_RUN_OUT=out, STABLEALIGN_NATS_URL="nats://h:4222")
    assert (str(seen[-1][1]), seen[-1][2]) == (out, "nats://h:4222")
    # --workers: -1 (one per extra core) unless given; STABLEALIGN_RUN_WORKERS by the same rule.
    assert seen[-1][3] == -1
    invoke(["run", "--out", out], STABLEALIGN_RUN_WORKERS="2")
    assert seen[-1][3] == 2


def _record_nats(monkeypatch, seen: list[Any], result: Any = None):
    from stablealign_app.cli import sandbox

    async def with_world_client(url, fn):
        seen.append(url)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(sandbox, "with_world_client", with_world_client)


@pytest.mark.parametrize("args, result, code", [
    (["worlds", "list"], [], 0),
    (["worlds", "show", "w1"], Stop("recorded"), 1),
    (["watch", "w1"], None, 0),
])
def test_world_commands_read_the_shared_nats_url(monkeypatch, args, result, code):
    seen: list[str] = []
    _record_nats(monkeypatch, seen, result)
    assert invoke(args, STABLEALIGN_NATS_URL="nats://env:4222").exit_code == code
    assert invoke([*args, "--nats", "nats://flag:4222"], STABLEALIGN_NATS_URL="nats://env:4222").exit_code == code
    assert seen == ["nats://env:4222", "nats://flag:4222"]


def test_watch_and_export_read_their_own(monkeypatch, tmp_path):
    from stablealign.sandbox.record_stream import ExportResult, ReadStats
    from stablealign_app.cli import sandbox

    seen: list[str] = []
    out = tmp_path / "records.jsonl"
    exported = ExportResult(path=out, records=0, stats=ReadStats(subject="sandbox.records.w1"))
    monkeypatch.setattr(sandbox, "call_world", lambda url, fn: seen.append(url) or exported)
    result = invoke(["export", "w1"], STABLEALIGN_EXPORT_OUT=str(out))
    assert result.exit_code == 0 and str(out) in result.output
    assert seen == ["nats://127.0.0.1:4222"]
    result = invoke(["watch", "w1"], STABLEALIGN_WATCH_LIMIT="nope")  # --limit is read from it
    assert result.exit_code == 2 and "--limit" in result.output
    assert invoke(["watch", "w1"], STABLEALIGN_WATCH_LIMIT="3").exit_code == 0


def test_export_out_from_its_variable_is_checked(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = invoke(["export", "w1"], STABLEALIGN_EXPORT_OUT=str(blocker / "records.jsonl"))
    assert result.exit_code == 2
    assert "--out" in result.output and "is a file" in result.output


def test_data_build(monkeypatch, tmp_path):
    from stablealign.training import data as data_mod

    seen: list[dict] = []

    def build(rows, groups, **kwargs):
        seen.append(kwargs)
        raise Stop("recorded")

    monkeypatch.setattr(data_mod, "read_inputs", lambda path: ([], []))
    monkeypatch.setattr(data_mod, "build_alignment_data", build)
    args = ["data", "build", "--records", "r.jsonl"]
    env = {"STABLEALIGN_DATA_BUILD_OUT": str(tmp_path / "a.jsonl"), "STABLEALIGN_DATA_BUILD_SEED": "11",
           "STABLEALIGN_DATA_BUILD_MIX": "1:1:1"}
    assert invoke(args, **env).exit_code == 2
    assert (seen[-1]["seed"], seen[-1]["mix_ratio"]) == (11, "1:1:1")
    assert invoke([*args, "--seed", "4"], **env).exit_code == 2
    assert seen[-1]["seed"] == 4
    invoke(args, **env, STABLEALIGN_SEED="99")
    assert seen[-1]["seed"] == 11


def test_train(monkeypatch, tmp_path):
    from stablealign.training import cli as training_cli

    seen: list[dict] = []
    monkeypatch.setattr(training_cli, "run_training", lambda config, stop_after=None: seen.append(config))
    env = {"STABLEALIGN_TRAIN_MODEL": "m", "STABLEALIGN_TRAIN_DATA": "d.jsonl",
           "STABLEALIGN_TRAIN_OUTPUT_DIR": str(tmp_path / "o"), "STABLEALIGN_TRAIN_MAX_STEPS": "3",
           "STABLEALIGN_TRAIN_LEARNING_RATE": "0.25"}
    result = invoke(["train"], **env)
    assert result.exit_code == 0, result.output
    assert (seen[-1]["model"], seen[-1]["max_steps"], seen[-1]["learning_rate"]) == ("m", 3, 0.25)
    assert invoke(["train", "--lr", "0.5"], **env).exit_code == 0
    assert seen[-1]["learning_rate"] == 0.5
    invoke(["train"], **env, STABLEALIGN_LR="0.125", STABLEALIGN_SEED="5", STABLEALIGN_MODEL="other")
    assert (seen[-1]["learning_rate"], seen[-1].get("seed"), seen[-1]["model"]) == (0.25, None, "m")


def test_train_submit_takes_the_shared_nats(monkeypatch):
    import services.trainer.client as client
    from stablealign.v1 import trainer_pb2

    sent: list[str] = []

    async def submit_job(nats, spec):
        sent.append(nats)
        return trainer_pb2.Job(spec=trainer_pb2.JobSpec(job_id="job-1"), state=trainer_pb2.JOB_STATE_QUEUED)

    monkeypatch.setattr(client, "submit_job", submit_job)
    # --out of a submitted job is a path on the trainer's side: not checked here.
    args = ["train", "--model", "m", "--data", "d", "--out", "/proc/no/such/dir", "--submit"]
    for extra, env in (([], {"STABLEALIGN_NATS_URL": "nats://env:4222"}), (["--nats", "nats://flag:4222"], {}),
                       (["--trainer-nats", "nats://old:4222"], {})):
        result = invoke([*args, *extra], **env)
        assert result.exit_code == 0, result.output
    assert sent == ["nats://env:4222", "nats://flag:4222", "nats://old:4222"]


def test_eval(monkeypatch, tmp_path):
    from stablealign.training import evaluate

    seen: list[dict] = []

    def run_eval(model, **kwargs):
        seen.append({"model": model, **kwargs})
        raise Stop("recorded")

    monkeypatch.setattr(evaluate, "run_eval", run_eval)
    out = str(tmp_path / "e")
    assert invoke(["eval", "--model", "m", "--out", out], STABLEALIGN_EVAL_QUESTIONS="5").exit_code == 2
    assert seen[-1]["questions_limit"] == 5
    assert invoke(["eval", "--out", out], STABLEALIGN_EVAL_MODEL="from-env").exit_code == 2
    assert seen[-1]["model"] == "from-env"


def test_generate(monkeypatch):
    from stablealign.training import generate

    seen: list[str] = []

    def load_model(model):
        seen.append(model)
        raise Stop("recorded")

    monkeypatch.setattr(generate, "load_model", load_model)
    assert invoke(["generate", "--prompt", "hi"], STABLEALIGN_GENERATE_MODEL="from-env").exit_code == 2
    assert invoke(["generate", "--prompt", "hi", "--model", "flag"], STABLEALIGN_GENERATE_MODEL="env").exit_code == 2
    assert seen == ["from-env", "flag"]
    result = invoke(["generate", "--prompt", "hi"], STABLEALIGN_GENERATE_MODEL="m",
                    STABLEALIGN_GENERATE_MAX_NEW_TOKENS="many")
    assert result.exit_code == 2 and "--max-new-tokens" in result.output


def test_model_pull_and_init_tiny(monkeypatch, tmp_path):
    from stablealign.llm import models
    from stablealign_app import tinymodel

    seen: list[Any] = []
    monkeypatch.setattr(models, "pull", lambda name, out, force=False: seen.append((name, out, force)) or out)
    monkeypatch.setattr(tinymodel, "build_tiny_model", lambda out, **kw: seen.append((out, kw)) or out)
    target = tmp_path / "m"
    assert invoke(["model", "pull", "smollm2-135m-instruct"], STABLEALIGN_MODEL_PULL_OUT=str(target)).exit_code == 0
    assert seen[-1] == ("smollm2-135m-instruct", target, False)
    assert invoke(["model", "pull", "x"], STABLEALIGN_MODEL_PULL_FORCE="true").exit_code == 0
    assert seen[-1][2] is True
    assert invoke(["model", "init-tiny"], STABLEALIGN_MODEL_INIT_TINY_OUT=str(target),
                  STABLEALIGN_MODEL_INIT_TINY_LAYERS="3").exit_code == 0
    assert seen[-1][0] == target and seen[-1][1]["layers"] == 3


def test_jobs(monkeypatch):
    import contextlib

    import services.trainer.client as client
    from stablealign.v1 import trainer_pb2

    seen: list[Any] = []

    async def get_job(nats, job_id, timeout=10):
        seen.append(("get", nats, job_id))
        raise Stop("recorded")

    async def list_jobs(nats, timeout=10):
        seen.append(("list", nats))
        return []

    async def cancel_job(nats, job_id, timeout=60):
        seen.append(("cancel", nats, job_id))
        raise Stop("recorded")

    @contextlib.asynccontextmanager
    async def connected(nats, name="x", connect_timeout=5.0):
        seen.append(("connect", nats))
        raise Stop("recorded")
        yield  # pragma: no cover

    class Client:
        def __init__(self, nc):
            pass

    monkeypatch.setattr(client, "get_job", get_job)
    monkeypatch.setattr(client, "list_jobs", list_jobs)
    monkeypatch.setattr(client, "cancel_job", cancel_job)
    monkeypatch.setattr(client, "connected", connected)
    monkeypatch.setattr(client, "TrainerClient", Client)
    nats = {"STABLEALIGN_NATS_URL": "nats://env:4222"}
    assert invoke(["jobs", "list"], **nats).exit_code == 0
    assert invoke(["jobs", "show", "j1"], **nats).exit_code == 2
    assert invoke(["jobs", "cancel", "j1"], **nats).exit_code == 2
    assert invoke(["jobs", "logs", "j1"], **nats).exit_code == 2
    assert invoke(["jobs", "submit", "--data", "d"], STABLEALIGN_JOBS_SUBMIT_MODEL="m", **nats).exit_code == 2
    assert seen == [("list", "nats://env:4222"), ("get", "nats://env:4222", "j1"),
                    ("cancel", "nats://env:4222", "j1"), ("connect", "nats://env:4222"),
                    ("connect", "nats://env:4222")]
    # Their own options: a value that is no number, from the command's own variable, is a usage error.
    result = invoke(["jobs", "submit", "--model", "m", "--data", "d"], STABLEALIGN_JOBS_SUBMIT_GPUS="two")
    assert result.exit_code == 2 and "--gpus" in result.output
    result = invoke(["jobs", "show", "j1"], STABLEALIGN_JOBS_SHOW_JSON="perhaps")
    assert result.exit_code == 2 and "--json" in result.output
    assert trainer_pb2.Job  # the module the commands use is importable


def test_serve(monkeypatch):
    from stablealign_app.cli import serve as serve_cli

    seen: list[Any] = []

    async def serve_forever(name, settings, build):
        seen.append((name, settings))
        return 0

    monkeypatch.setattr(serve_cli, "serve_forever", serve_forever)
    env = {"STABLEALIGN_NATS_URL": "nats://env:4222", "STABLEALIGN_GRPC_PORT": "4321",
           "STABLEALIGN_METRICS_PORT": "-1", "STABLEALIGN_INSTANCE": "i-env"}
    assert invoke(["serve", "agent"], **env).exit_code == 0
    name, settings = seen[-1]
    assert (name, settings.nats_url, settings.grpc_port, settings.instance) == ("agent", "nats://env:4222", 4321,
                                                                               "i-env")
    assert invoke(["serve", "agent", "--grpc-port", "-1", "--log-format", "json"], **env).exit_code == 0
    assert (seen[-1][1].grpc_port, seen[-1][1].log_format) == (-1, "json")
    assert invoke(["--log-format", "console", "serve", "agent"], **env).exit_code == 0
    assert seen[-1][1].log_format == "console"
    assert invoke(["serve", "agent"], **env, STABLEALIGN_LOG_FORMAT="json").exit_code == 0
    assert seen[-1][1].log_format == "json"


def test_pipeline(monkeypatch, tmp_path):
    from stablealign_app.cli import pipeline

    steps: list[list[str]] = []
    monkeypatch.setattr(pipeline, "_step", lambda title, args, env=None: steps.append(args) or 0.0)
    env = {"STABLEALIGN_PIPELINE_OUT": str(tmp_path / "p"), "STABLEALIGN_PIPELINE_SEED": "5",
           "STABLEALIGN_PIPELINE_BACKEND": "offline", "STABLEALIGN_SEED": "9"}
    result = invoke(["pipeline"], **env)
    assert result.exit_code == 0, result.output
    run = next(args for args in steps if args[0] == "run")
    assert run[run.index("--seed") + 1] == "5"
    assert run[run.index("--out") + 1] == str(tmp_path / "p" / "sandbox")
    steps.clear()
    assert invoke(["pipeline", "--seed", "6"], **env).exit_code == 0
    run = next(args for args in steps if args[0] == "run")
    assert run[run.index("--seed") + 1] == "6"


def test_root_log_options_read_the_shared_variables(monkeypatch):
    from stablealign.core import logs

    assert invoke(["--help"], STABLEALIGN_LOG_LEVEL="warning", STABLEALIGN_LOG_FORMAT="json").exit_code == 0
    result = invoke(["jobs", "list"], STABLEALIGN_LOG_LEVEL="chatty")
    assert result.exit_code == 2 and "--log-level" in result.output
    monkeypatch.setattr("services.trainer.client.list_jobs", _no_jobs)
    assert invoke(["jobs", "list"], STABLEALIGN_LOG_LEVEL="warning", STABLEALIGN_LOG_FORMAT="json").exit_code == 0
    assert logs.current_logging() == ("WARNING", "json")
    assert invoke(["jobs", "list", "--log-level", "error"], STABLEALIGN_LOG_LEVEL="warning").exit_code == 0
    assert logs.current_logging()[0] == "ERROR"  # the command's own flag wins


async def _no_jobs(nats, timeout=10):
    return []


def test_the_docs_state_the_rule():
    """docs/cli.md states the rule with its examples; the README sends the reader there."""
    repo = Path(__file__).resolve().parents[2]
    cli_doc = (repo / "docs" / "cli.md").read_text()
    for text in ("STABLEALIGN_<CMD>_<FLAG>", "STABLEALIGN_NATS_URL", "STABLEALIGN_RUN_SEED",
                 "STABLEALIGN_DATA_BUILD_OUT", "STABLEALIGN_TRAIN_LEARNING_RATE", "STABLEALIGN_GRPC_PORT"):
        assert text in cli_doc, text
    readme = (repo / "README.md").read_text()
    assert "docs/cli.md" in readme.split("## Command line", 1)[1].split("\n## ", 1)[0]


def test_every_command_and_group_answers_a_usage_error_with_exit_2():
    for path, command in walk(typer.main.get_command(app)):
        result = invoke([*path, "--no-such-flag"])
        assert result.exit_code == 2, (path, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: No such option: --no-such-flag"), (path, lines)
        assert lines[0].endswith(f"{' '.join(path)} --help')".lstrip()), (path, lines)
        if getattr(command, "commands", None) and path:
            assert invoke(list(path)).exit_code == 2, path  # a group without its command


# --- NATS credentials -------------------------------------------------------------------------------


def test_every_command_that_connects_takes_the_nats_credentials():
    for path, command in walk(typer.main.get_command(app)):
        flags = {o for option in options(command) for o in option.opts}
        if "--nats" in flags:
            assert {"--nats-user", "--nats-password", "--nats-password-file", "--nats-creds", "--nats-ca",
                    "--nats-tls-cert", "--nats-tls-key", "--nats-inbox-prefix", "--nats-world-js-prefix",
                    "--nats-trainer-js-prefix"} <= flags, path


def test_a_command_connects_with_the_credentials_of_its_flags_and_variables(monkeypatch, tmp_path):
    import services.trainer.client as client
    from stablealign.nats import auth as natsauth

    seen: list[natsauth.NatsClientOptions] = []

    async def list_jobs(nats, timeout=10):
        seen.append(natsauth.client_options())  # what bus.connect would use
        return []

    monkeypatch.setattr(client, "list_jobs", list_jobs)
    password_file = tmp_path / "password"
    password_file.write_text("from-file\n")
    assert invoke(["jobs", "list"], STABLEALIGN_NATS_USER="cli", STABLEALIGN_NATS_PASSWORD="pw").exit_code == 0
    assert (seen[-1].user, seen[-1].password) == ("cli", "pw")
    assert seen[-1].reply_inbox_prefix() == "_INBOX_cli"  # the cli user's own replies (nats_permissions)
    assert invoke(["jobs", "list", "--nats-inbox-prefix", "_INBOX"], STABLEALIGN_NATS_USER="cli").exit_code == 0
    assert seen[-1].reply_inbox_prefix() == "_INBOX"
    assert seen[-1].jetstream_prefix("world") == "$JS.API"  # an unsecured server's
    assert invoke(["jobs", "list", "--nats-trainer-js-prefix", "$JS.TRAINER.API"],
                  STABLEALIGN_NATS_WORLD_JS_PREFIX="$JS.WORLD.API").exit_code == 0
    assert (seen[-1].jetstream_prefix("world"), seen[-1].jetstream_prefix("trainer")) == ("$JS.WORLD.API",
                                                                                          "$JS.TRAINER.API")
    assert invoke(["jobs", "list", "--nats-user", "other", "--nats-password-file", str(password_file)],
                  STABLEALIGN_NATS_USER="cli").exit_code == 0
    assert (seen[-1].user, seen[-1].password) == ("other", "from-file")  # flags win
    assert natsauth.client_options() == natsauth.NatsClientOptions()  # only for the command's time
    result = invoke(["jobs", "list"], STABLEALIGN_NATS_CA=str(tmp_path / "no-such-ca.pem"))
    assert result.exit_code == 2 and "STABLEALIGN_NATS_CA" in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_serve_takes_the_nats_credentials_as_settings(monkeypatch):
    from stablealign_app.cli import serve as serve_cli

    seen: list[Any] = []

    async def serve_forever(name, settings, build):
        seen.append(settings)
        return 0

    monkeypatch.setattr(serve_cli, "serve_forever", serve_forever)
    assert invoke(["serve", "agent", "--nats-user", "agent"], STABLEALIGN_NATS_PASSWORD="pw").exit_code == 0
    assert (seen[-1].nats_user, seen[-1].nats_password) == ("agent", "pw")
    assert "pw" not in repr(seen[-1])
