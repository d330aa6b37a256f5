"""The command line behaves like the tools its users know, checked on real processes.

- Fail fast, in one line: a ``--nats`` that is no NATS URL (exit 2, at once), a NATS server that
  cannot be reached (exit 1 within a few seconds, no warning per reconnect attempt), an ``--out``
  that cannot be written (exit 2 before any simulation or model load), usage errors (exit 2).
- Logging set up once: human lines in a pipe by default, JSON lines with ``--log-format json`` or in
  a Kubernetes pod, the progress bar on a terminal only, log lines above it rather than inside it.
- Figures rounded for people, exact in JSON; echoed commands that a shell parses back.
"""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stablealign.core.logs import ConsoleFormatter, JsonFormatter
from stablealign.core.metrics import free_port

pytestmark = pytest.mark.timeout(60)

CLI = [sys.executable, "-m", "stablealign_app.cli.main"]
REPO = Path(__file__).resolve().parents[2]
# A small world on the embedded stack that finishes in seconds.
SMALL_RUN = ["run", "--size", "2", "--rounds", "1", "--backend", "offline", "--embedding-model", "hashing",
             "--prior-size", "5"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STABLEALIGN_")}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    env.update(extra)
    return env


def _cli(args: list[str], timeout: float = 45, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([*CLI, *args], cwd=REPO, env=_env(**env), capture_output=True, text=True,
                            timeout=timeout)
    return result, time.monotonic() - started


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


# --- fail fast ----------------------------------------------------------------------------------------

NATS_COMMANDS = {
    "run": ["run"],
    "export": ["export", "w1", "--out", "{tmp}/r.jsonl"],
    "watch": ["watch", "w1"],
    "worlds list": ["worlds", "list"],
    "worlds show": ["worlds", "show", "w1"],
    "data build": ["data", "build", "--world", "w1", "--out", "{tmp}/a.jsonl"],
    "jobs submit": ["jobs", "submit", "--model", "m", "--data", "d"],
    "jobs list": ["jobs", "list"],
    "jobs show": ["jobs", "show", "j1"],
    "jobs logs": ["jobs", "logs", "j1"],
    "jobs cancel": ["jobs", "cancel", "j1"],
    "train --submit": ["train", "--model", "m", "--data", "d", "--out", "o", "--submit"],
    "serve": ["serve", "agent"],
}


def _args(name: str, tmp_path: Path) -> list[str]:
    return [arg.format(tmp=tmp_path) for arg in NATS_COMMANDS[name]]


@pytest.mark.parametrize("name", NATS_COMMANDS)
def test_a_url_that_is_no_nats_url_is_one_line_and_exit_2(name, tmp_path):
    result, seconds = _cli([*_args(name, tmp_path), "--nats", "http://127.0.0.1:4222"])
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result)
    assert "--nats" in line and "'http://127.0.0.1:4222'" in line and "nats://" in line
    assert seconds < 20  # no connection was tried (most of this is Python starting)


@pytest.mark.parametrize("value", ["localhost:4222", "nats://", "ftp://host:4222"])
def test_other_malformed_urls_and_the_environment_variable(value, tmp_path):
    result, _ = _cli(["worlds", "list"], STABLEALIGN_NATS_URL=value)
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "--nats" in line and "STABLEALIGN_NATS_URL" in line


@pytest.mark.parametrize("name", ["run", "export", "worlds list", "data build", "jobs list", "train --submit"])
def test_an_unreachable_server_is_one_line_within_seconds(name, tmp_path):
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    result, seconds = _cli([*_args(name, tmp_path), "--nats", url])
    assert result.returncode == 1, result.stderr
    line = _one_error_line(result)  # no reconnect warning per attempt
    assert line.startswith(f"error: cannot reach NATS at {url} within 5s"), line
    assert seconds < 20, seconds  # 5 s of trying, plus Python starting on a busy machine


def _blocked(tmp_path: Path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    return blocker / "out"


OUT_COMMANDS = {
    "run": SMALL_RUN,
    "pipeline": ["pipeline", "--backend", "offline"],
    "data build": ["data", "build", "--records", "{tmp}/records.jsonl"],
    "export": ["export", "w1"],
    "eval": ["eval", "--model", "{tmp}/no-model"],
    "train": ["train", "--model", "{tmp}/no-model", "--data", "{tmp}/no-data.jsonl"],
    "model init-tiny": ["model", "init-tiny"],
}


@pytest.mark.parametrize("name", OUT_COMMANDS)
@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_an_unwritable_out_fails_before_anything_starts(name, where, tmp_path):
    out = _blocked(tmp_path) if where == "under a file" else Path("/proc/stable-align-test/out")
    args = [arg.format(tmp=tmp_path) for arg in OUT_COMMANDS[name]]
    result, seconds = _cli([*args, "--out", str(out)])
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result)
    assert "--out" in line and str(out) in line
    assert seconds < 20
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["a-file"] if where == "under a file" else [])


@pytest.mark.parametrize("args", [
    ["run", "--no-such-flag"],
    ["run", "--setting", "everyone_nice"],
    ["run", "--size", "three"],
    ["data", "build", "--records", "r.jsonl"],  # --out is required
    ["export"],  # the world id is required
    ["--log-format", "xml", "run"],
    ["no-such-command"],
    [],
    ["jobs"],
    ["worlds"],
    ["data"],
    ["model"],
])
def test_usage_errors_exit_2(args):
    result, _ = _cli(args)
    assert result.returncode == 2, (args, result.stdout[-500:], result.stderr[-500:])
    assert "Traceback" not in result.stderr
    if args in ([], ["jobs"], ["worlds"], ["data"], ["model"]):  # a group without its command: help, exit 2
        assert "Usage" in result.stdout + result.stderr
    else:
        _one_error_line(result)


# --- terminal or not --------------------------------------------------------------------------------


def _no_terminal_codes(text: str) -> None:
    assert "\r" not in text and "\x1b[" not in text, text[:2000]


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_in_a_pipe_human_lines_and_no_bar(tmp_path):
    result, _ = _cli([*SMALL_RUN, "--out", str(tmp_path / "o")])
    assert result.returncode == 0, result.stderr[-3000:]
    _no_terminal_codes(result.stdout)
    _no_terminal_codes(result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any("world.round_done" in line for line in lines), result.stderr  # the log is there (info)
    assert not any(_is_json_object(line) for line in lines), result.stderr
    assert re.search(r"^\d\d:\d\d:\d\d INFO services\.world\.scheduler: world\.round_done", result.stderr, re.M)
    assert "records:" in result.stdout and "mean ratings per round" in result.stdout  # results on stdout


@pytest.mark.parametrize("how", ["--log-format json", "run --log-format json", "STABLEALIGN_LOG_FORMAT",
                                 "in a Kubernetes pod"])
def test_json_when_asked_or_in_a_pod(how, tmp_path):
    args, env = [*SMALL_RUN, "--out", str(tmp_path / "o")], {}
    if how == "--log-format json":
        args = ["--log-format", "json", *args]
    elif how == "run --log-format json":
        args = [*args, "--log-format", "json"]
    elif how == "STABLEALIGN_LOG_FORMAT":
        env = {"STABLEALIGN_LOG_FORMAT": "json"}
    else:
        env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    result, _ = _cli(args, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(_is_json_object(line) for line in lines), result.stderr[-3000:]
    events = [json.loads(line)["event"] for line in lines]
    assert "world.round_done" in events
    _no_terminal_codes(result.stderr)


def _run_in_terminal(args: list[str], timeout: float = 45) -> tuple[int, str]:
    """Runs the CLI with stdin, stdout and stderr on a pseudo-terminal; returns its exit code and output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, *args], cwd=REPO, env=_env(COLUMNS="100"), stdin=slave, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", errors="replace")


def test_on_a_terminal_the_bar_with_log_lines_above_it(tmp_path):
    code, output = _run_in_terminal([*SMALL_RUN, "--out", str(tmp_path / "o")])
    assert code == 0, output[-3000:]
    assert "\x1b[" in output and "\r" in output and "━" in output  # the bar, redrawn in place
    assert re.search(r"world w-\w+", output)
    assert re.search(r"4/4", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output))
    # Every log line starts on a line of its own (after the bar was cleared), never after bar characters.
    logged = 0
    for piece in output.split("\n"):
        if " INFO " not in piece and " WARN " not in piece:
            continue
        text = piece.split("\x1b[2K")[-1].lstrip("\r")
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
        if re.search(r"\d\d:\d\d:\d\d (INFO|WARN) ", text):
            assert re.match(r"\d\d:\d\d:\d\d (INFO|WARN) ", text), repr(piece[:300])
            logged += 1
    assert logged >= 3, output[-3000:]


# --- figures and echoed commands --------------------------------------------------------------------


def _record(**fields) -> logging.LogRecord:
    record = logging.LogRecord("train", logging.INFO, __file__, 1, "train.step", None, None)
    record.__dict__.update(fields)
    return record


def test_figures_are_rounded_for_people_and_exact_in_json():
    fields = {"loss": 0.43512, "step_seconds": 3.14159, "lr": 2e-05, "tokens_per_second": 1234.56, "step": 7,
              "ok": True}
    line = ConsoleFormatter().format(_record(**fields))
    assert "loss=0.435 step_seconds=3.1 lr=2e-05 tokens_per_second=1235 step=7 ok=True" in line
    assert {k: json.loads(JsonFormatter().format(_record(**fields)))[k] for k in fields} == fields


def test_echoed_steps_can_be_pasted(monkeypatch):
    from stablealign_app.cli import pipeline

    args = ["run", "--out", "runs/with space", "--questions", "it's [bold]"]
    env = {"STABLEALIGN_MAX_TOKENS": "32 64"}
    shown = pipeline.echoed(args, env)
    assert shlex.split(shown) == ["STABLEALIGN_MAX_TOKENS=32 64", "stable-align", *args]
    seen: list[dict] = []

    def fake_run(command, check, env):
        seen.append({"command": command, "env": env})
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(pipeline.subprocess, "run", fake_run)
    monkeypatch.setenv("STABLEALIGN_NATS_URL", "nats://somewhere:4222")
    pipeline._step("a step", args, env)
    (call,) = seen
    assert call["command"][-len(args):] == args
    assert call["env"]["STABLEALIGN_MAX_TOKENS"] == "32 64"
    assert "STABLEALIGN_NATS_URL" not in call["env"]  # the pipeline's steps run on its own embedded stack
    assert call["env"]["STABLEALIGN_LOG_LEVEL"] and call["env"]["STABLEALIGN_LOG_FORMAT"]
