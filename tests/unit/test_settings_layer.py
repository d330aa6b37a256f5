"""Every environment variable is read through the settings layer, each process is set up by one function.

The settings layer is ``stablealign/core/config.py``, ``stablealign/core/settings.py`` (the raw environment, for the
names chosen at run time) and the services' ``settings.py``; any other product module that reads
``os.environ`` or calls ``os.getenv`` fails here. Handing the environment to a child process
(``dict(os.environ, ...)``, ``{**os.environ, ...}``) and setting a variable are writes, not reads.
"""

from __future__ import annotations

import ast
import gc
import logging
from pathlib import Path

import pytest

from stablealign.core import logs
from stablealign.core.config import LaunchSettings, PathSettings, TrainingProcessSettings, load_settings
from stablealign.core.errors import ConfigError
from stablealign.core.process import setup_process
from stablealign.serving.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("stablealign", "services", "stablealign_app")


def product_modules() -> list[Path]:
    return [p for package in PRODUCT for p in sorted((ROOT / package).rglob("*.py"))
            if (ROOT / "stablealign" / "v1") not in p.parents]


def in_settings_layer(path: Path) -> bool:
    return path.name == "settings.py" or path == ROOT / "stablealign" / "config.py"


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name) \
        and node.value.id == "os"


def _handed_on(node: ast.AST, parent: ast.AST | None) -> bool:
    """``os.environ`` copied whole for a child process, or a variable set or deleted: not a read."""
    if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and parent.func.id == "dict":
        return bool(parent.args) and parent.args[0] is node
    if isinstance(parent, ast.Dict):
        return any(key is None and value is node for key, value in zip(parent.keys, parent.values, strict=True))
    if isinstance(parent, ast.Subscript):
        return isinstance(parent.ctx, (ast.Store, ast.Del))
    return False


def environment_reads(source: str) -> list[int]:
    """Line numbers where ``source`` reads the process environment directly."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        if _is_environ(node) and not _handed_on(node, parents.get(node)):
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "getenv" and isinstance(node.value, ast.Name) \
                and node.value.id == "os":
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" \
                and any(alias.name in ("environ", "getenv") for alias in node.names):
            lines.append(node.lineno)
    return lines


def test_no_environment_read_outside_the_settings_layer():
    offenders = [f"{path.relative_to(ROOT)}:{line}" for path in product_modules() if not in_settings_layer(path)
                 for line in environment_reads(path.read_text(encoding="utf-8"))]
    assert not offenders, f"read these through a settings class (stablealign/core/config.py): {offenders}"


@pytest.mark.parametrize("source, reads", [
    ("import os\nx = os.environ.get('A')", [2]),
    ("import os\nx = os.environ['A']", [2]),
    ("import os\nx = 'A' in os.environ", [2]),
    ("import os\nx = os.getenv('A')", [2]),
    ("from os import environ", [1]),
    ("import os\nenv = os.environ if e is None else e", [2]),
    ("import os\nchild = dict(os.environ, A='1')", []),
    ("import os\nchild = {**os.environ, 'A': '1'}", []),
    ("import os\nos.environ['A'] = '1'", []),
    ("import os\ndel os.environ['A']", []),
])
def test_the_check_tells_reads_from_writes(source, reads):
    assert environment_reads(source) == reads


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("yes", True), ("on", True),
                                           ("0", False), ("false", False), ("no", False), ("off", False)])
def test_fsdp_cpu_is_a_boolean_parsed_like_every_other(raw, expected):
    # It was compared with "1": "true" switched FSDP on the CPU off.
    assert load_settings(TrainingProcessSettings, environ={"STABLEALIGN_FSDP_CPU": raw}).fsdp_cpu is expected


def test_fsdp_cpu_defaults_on_and_rejects_a_typo():
    assert load_settings(TrainingProcessSettings, environ={}).fsdp_cpu is True
    with pytest.raises(ConfigError, match="STABLEALIGN_FSDP_CPU"):
        load_settings(TrainingProcessSettings, environ={"STABLEALIGN_FSDP_CPU": "maybe"})


def test_launcher_variables_are_read_under_their_own_names():
    launch = load_settings(LaunchSettings, environ={"WORLD_SIZE": "4", "RANK": "2", "STABLEALIGN_RANK": "9"})
    assert (launch.world_size, launch.rank) == (4, 2)
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        load_settings(LaunchSettings, environ={"WORLD_SIZE": "two"})


def test_paths_come_from_their_variables():
    paths = load_settings(PathSettings, environ={"STABLEALIGN_DATA_DIR": "/d", "STABLEALIGN_MODEL_ROOTS": "/a,/b"})
    assert (paths.data_dir, paths.model_roots, paths.cache_dir) == ("/d", "/a,/b", "")


@pytest.fixture
def restored_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    locked, current = logs._locked, logs._current
    yield
    root.handlers[:], logs._locked, logs._current = handlers, locked, current
    root.setLevel(level)


def test_setup_process_reads_the_logging_variables(monkeypatch, restored_logging):
    monkeypatch.setattr(logs, "_locked", False)
    monkeypatch.setenv("STABLEALIGN_LOG_LEVEL", "warning")
    monkeypatch.setenv("STABLEALIGN_LOG_FORMAT", "json")
    setup_process()
    root = logging.getLogger()
    assert root.level == logging.WARNING and isinstance(root.handlers[0].formatter, logs.JsonFormatter)
    setup_process(log_level="debug", log_format="console", lock=True)  # a command's flags win
    assert root.level == logging.DEBUG and isinstance(root.handlers[0].formatter, logs.ConsoleFormatter)
    setup_process()  # locked: the command line's choice holds
    assert root.level == logging.DEBUG


def test_setup_process_names_a_bad_level(monkeypatch, restored_logging):
    monkeypatch.setattr(logs, "_locked", False)
    monkeypatch.setenv("STABLEALIGN_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match="STABLEALIGN_LOG_LEVEL='loud'"):
        setup_process()


def test_setup_process_settles_the_collector_once_serving(restored_logging):
    threshold = gc.get_threshold()
    handlers = logging.getLogger().handlers[:]
    try:
        setup_process(load_settings(ServiceSettings, {"gc_gen0_threshold": 12_345}, environ={}), serving=True)
        assert gc.get_threshold()[0] == 12_345 and gc.get_freeze_count() > 0
        assert logging.getLogger().handlers == handlers  # logging untouched
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()
