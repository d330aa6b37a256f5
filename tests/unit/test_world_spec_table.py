"""The world spec is declared once (services.world.spec.SPEC_FIELDS): every WorldSpec field is in the
table, every option of `run` and `pipeline` that sets a spec field is generated from it, what `run`
sends is what build_spec makes of the same values, CreateWorld's bounds and defaults are the
table's, and `serve`'s flags are the service settings' own."""

from __future__ import annotations

import enum
import math
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from services.world.settings import WorldSettings
from services.world.spec import FIELDS, OPTION_FIELDS, SPEC_FIELDS, build_spec, resolve_spec
from stablealign.core.errors import StableAlignError, ValidationError
from stablealign.serving.settings import ServiceSettings
from stablealign.v1 import world_pb2
from stablealign_app.cli.main import app
from tests.support.cli import clean_env, restore_logging  # noqa: F401 (autouse fixtures)

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
# Options every command that connects or logs has (cli.rules): not spec fields.
SHARED = {"nats", "log_level", "log_format", "nats_user", "nats_password", "nats_password_file", "nats_creds",
          "nats_ca", "nats_tls_cert", "nats_tls_key", "nats_inbox_prefix", "nats_world_js_prefix",
          "nats_trainer_js_prefix"}
# run's own options: where the records go and how the command runs, not what the world is.
RUN_OWN = {"out", "timeout", "workers"}
# pipeline options named like a spec field that are not that field (names kept from before the table).
PIPELINE_NAMESAKES = {
    "backend": "hf|offline: the models of the whole pipeline (world, training, evaluation), passed on to run",
    "model": "the real model of the whole pipeline, passed on to run as the agents' and observers' model",
    "questions": "held-out questions answered at evaluation, not a question file",
}
PIPELINE_SPEC_OPTIONS = {"size", "rounds", "partners", "seed"}




def command(name: str) -> Any:
    return typer.main.get_command(app).commands[name]


def options(cmd: Any) -> dict[str, Any]:
    return {p.name: p for p in cmd.params if getattr(p, "param_type_name", "") == "option" and p.name != "help"}


def spec_leaves(descriptor: Any = world_pb2.WorldSpec.DESCRIPTOR, prefix: str = "") -> set[str]:
    leaves = set()
    for field in descriptor.fields:
        if field.message_type is not None and not field.is_repeated:
            leaves |= spec_leaves(field.message_type, f"{prefix}{field.name}.")
        else:
            leaves.add(prefix + field.name)
    return leaves


def assert_from_table(option: Any, help: str | None = None) -> None:
    field = FIELDS[option.name]
    assert option.opts == [field.cli_flag], option.name
    annotation = option.type_descriptor.annotation
    if field.choices:
        assert issubclass(annotation, enum.Enum) and tuple(m.value for m in annotation) == field.choices
        assert option.default.value == field.default, option.name
    else:
        assert annotation is field.kind and option.default == field.default, option.name
    assert option.help == (help or field.help), option.name


class Recorded(StableAlignError):
    """Ends `run` once the spec it would send is seen."""


@pytest.fixture
def sent(monkeypatch) -> list[world_pb2.WorldSpec]:
    """The specs `run` sends (its world is not run)."""
    from stablealign_app.cli import sandbox

    specs: list[world_pb2.WorldSpec] = []

    async def run_world(spec, out, nats_url, timeout, quiet=False, workers=-1):
        specs.append(spec)
        raise Recorded("recorded")

    monkeypatch.setattr(sandbox, "run_world", run_world)
    return specs


def run(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", *args, "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 1 and "recorded" in result.output, result.output


# --- one declaration --------------------------------------------------------------------------------


def test_every_world_spec_field_is_declared_once():
    protos = [f.proto for f in SPEC_FIELDS]
    assert sorted(protos) == sorted(spec_leaves())  # each field (and each ModelRef part) exactly once
    assert len({f.name for f in SPEC_FIELDS}) == len(SPEC_FIELDS)
    flags = [f.cli_flag for f in OPTION_FIELDS]
    assert len(set(flags)) == len(flags)


def test_every_run_option_that_sets_the_spec_comes_from_the_table():
    run_options = options(command("run"))
    spec_options = set(run_options) - SHARED - RUN_OWN
    assert spec_options == {f.name for f in OPTION_FIELDS}
    for name in spec_options:
        assert_from_table(run_options[name])
    # The names and flags people have in scripts are still there.
    assert {"--size", "--rounds", "--setting", "--backend", "--seed", "--partners", "--global-prob", "--prior-size",
            "--prior", "--questions", "--world-id", "--embedding-model"} <= {f.cli_flag for f in OPTION_FIELDS}


def test_every_pipeline_option_that_sets_the_spec_comes_from_the_table():
    pipeline_options = options(command("pipeline"))
    flags = {f.cli_flag for f in OPTION_FIELDS}
    namesakes = {name for name, o in pipeline_options.items()
                 if name in FIELDS or set(o.opts) & flags} - PIPELINE_SPEC_OPTIONS
    assert namesakes == set(PIPELINE_NAMESAKES)
    for name in PIPELINE_SPEC_OPTIONS:
        assert_from_table(pipeline_options[name],
                          help="Seed of the world and of training." if name == "seed" else None)


# --- the same spec on every path ----------------------------------------------------------------------


def test_run_sends_what_build_spec_makes(sent, tmp_path):
    run([], tmp_path)
    assert sent[-1] == build_spec()  # the defaults
    given = {"size": 5, "rounds": 3, "setting": "mixed_half_half", "backend": "openai", "seed": 9, "model": "m",
             "url": "http://127.0.0.1:9/v1", "observer_model": "judge", "embedding_model": "hashing",
             "embedding_backend": "offline", "partners": 2, "radius": 1.5, "global_partner_probability": 0.25,
             "concurrency": 4, "prior_size": 0, "questions": "q.txt", "world_id": "w1"}
    from stablealign_app.cli.spec_options import spec_args

    run(spec_args(given), tmp_path)
    spec = sent[-1]
    assert spec == build_spec(**given)
    assert (spec.observer_model.backend, spec.observer_model.model, spec.observer_model.url) == (
        "openai", "judge", "http://127.0.0.1:9/v1")  # observer options left empty take the agent's
    assert spec.HasField("prior_size") and spec.prior_size == 0 and spec.questions_path == "q.txt"


def test_pipeline_runs_the_world_its_options_describe(sent, monkeypatch, tmp_path):
    from stablealign_app.cli import pipeline

    steps: list[list[str]] = []
    monkeypatch.setattr(pipeline, "_step", lambda title, args, env=None: steps.append(args) or 0.0)
    result = CliRunner().invoke(app, ["pipeline", "--backend", "offline", "--out", str(tmp_path / "p"),
                                      "--size", "4", "--partners", "2", "--seed", "6"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_args = next(args for args in steps if args[0] == "run")
    run(run_args[1:run_args.index("--out")], tmp_path)  # the step's flags, read by run itself
    assert sent[-1] == build_spec(size=4, rounds=2, partners=2, seed=6, setting="half_half", backend="offline")


def test_pipeline_passes_bf16_scoring_to_eval_only_when_asked(sent, monkeypatch, tmp_path):
    from stablealign_app.cli import pipeline

    for flags, expected in (([], False), (["--eval-bf16"], True)):
        steps: list[list[str]] = []
        monkeypatch.setattr(pipeline, "_step", lambda title, args, env=None, steps=steps: steps.append(args) or 0.0)
        result = CliRunner().invoke(app, ["pipeline", "--backend", "offline", "--out", str(tmp_path / "p"), *flags],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        eval_args = next(args for args in steps if args[0] == "eval")
        assert ("--bf16" in eval_args) is expected
        assert not any("--bf16" in args for args in steps if args[0] != "eval")


def test_no_module_builds_a_spec_from_values_but_the_table():
    """The CLI, the embedded stack, the services and the bench build WorldSpecs with build_spec."""
    builders = []
    for root in ("stablealign_app", "services", "stablealign", "bench"):
        for path in (REPO / root).rglob("*.py"):
            if re.search(r"WorldSpec\(\s*\w+\s*=", path.read_text()):
                builders.append(str(path.relative_to(REPO)))
    assert builders == []


# --- CreateWorld's bounds and defaults (gRPC and NATS both go through resolve_spec) -------------------


def _resolve(**fields: Any) -> world_pb2.WorldSpec:
    spec = world_pb2.WorldSpec(size=3, rounds=1)
    for name, value in fields.items():
        setattr(spec, name, value)
    return resolve_spec(spec, WorldSettings(max_world_memory_mb=0), check_files=False)


BOUNDED = [f for f in SPEC_FIELDS if f.minimum is not None or f.maximum is not None]


@pytest.mark.parametrize("field", BOUNDED, ids=lambda f: f.name)
def test_create_world_refuses_a_value_outside_the_tables_bounds(field):
    step = 1 if field.kind is int else 1e-6
    outside = [v for v in (None if field.minimum is None else field.minimum - step,
                           None if field.maximum is None else field.maximum + step) if v is not None]
    if field.kind is float:
        outside.append(math.nan)
    for value in outside:
        if value == field.unset:  # outside the bounds, but it means "the default": the next value is refused
            value -= step
        with pytest.raises(ValidationError, match=rf"^{field.proto} must be {re.escape(field.bounds())}, got "):
            _resolve(**{field.proto: value})


@pytest.mark.parametrize("field", [f for f in BOUNDED if f.name != "size"], ids=lambda f: f.name)
def test_create_world_accepts_the_tables_bounds(field):
    for value in (field.minimum, field.maximum):
        if value is not None:
            resolved = _resolve(**{field.proto: field.kind(value)})
            assert getattr(resolved, field.proto) == field.kind(value) or value == field.unset


def test_create_world_fills_the_tables_defaults():
    filled = [f for f in SPEC_FIELDS if f.filled_by_service]
    assert {f.name for f in filled} == {"partners", "prior_size", "retrieval_k"}
    for field in filled:
        assert getattr(_resolve(**{field.proto: field.unset}), field.proto) == field.default
    assert _resolve().prior_size == FIELDS["prior_size"].default  # an optional field never set
    assert _resolve(setting="").setting == FIELDS["setting"].default


# --- serve: its flags are the service settings' -------------------------------------------------------


def test_serve_options_are_the_service_settings():
    from stablealign_app.cli.serve import SETTING_FLAGS

    serve_options = options(command("serve"))
    assert set(serve_options) - SHARED == set(SETTING_FLAGS)
    for name in SETTING_FLAGS:
        option, field = serve_options[name], ServiceSettings.model_fields[name]
        flag = "--nats" if name == "nats_url" else "--" + name.replace("_", "-")
        assert option.opts[0] == flag and option.help == field.description and option.default is None, name
        assert option.envvar == "STABLEALIGN_" + name.upper()
