"""The layers run one way and no logic is written twice (docs/architecture.md).

The import contracts live in pyproject.toml ([tool.importlinter]); ``lint-imports`` checks them here so
that CI (`make test`) fails on a wrong-way import, not only `make lint`. The copy check is ours: a run
of six significant lines (no blanks, comments, docstrings, imports or lone brackets) that appears twice
in the product code (generated protobuf code excluded) is logic that should live in one place.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT_ROOTS = ("stablealign", "stablealign_app", "services", "bench")
RUN = 6


def _lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports (import-linter, a dev dependency) is not installed: run make install")
    return exe


def test_import_contracts_hold():
    result = subprocess.run([_lint_imports()], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout), result.stdout


def test_a_wrong_way_import_is_caught(tmp_path):
    """The contracts are not vacuous: a library module importing a service breaks them."""
    tree = tmp_path / "tree"
    for root in ("stablealign", "stablealign_app", "services"):
        shutil.copytree(REPO / root, tree / root, ignore=shutil.ignore_patterns("__pycache__", "v1"))
    (tree / "stablealign" / "v1").mkdir()
    (tree / "stablealign" / "v1" / "__init__.py").write_text("")
    (tree / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (tree / "stablealign" / "wrong_way.py").write_text("import services.agent.handlers  # noqa\n")
    result = subprocess.run([_lint_imports()], cwd=tree, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0, result.stdout
    assert "stablealign.wrong_way -> services.agent" in result.stdout


def _significant_lines(path: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    in_docstring = False
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line.count('"""') == 1 or line.count("'''") == 1:
            in_docstring = not in_docstring
            continue
        if in_docstring or not line or line.startswith(("#", '"""', "'''")):
            continue
        if re.match(r"^(from\s+\S+\s+)?import\s", line) or len(re.sub(r"[\W_]", "", line)) < 3:
            continue
        out.append((number, line))
    return out


def repeated_runs(files: list[Path], run: int = RUN) -> list[tuple[str, str]]:
    """Pairs of places ("file:line") that share ``run`` significant lines, identical after stripping."""
    first_seen: dict[str, tuple[Path, int]] = {}
    pairs: list[tuple[str, str]] = []
    for path in files:
        lines = _significant_lines(path)
        for i in range(len(lines) - run + 1):
            key = hashlib.sha1("\n".join(text for _, text in lines[i:i + run]).encode()).hexdigest()
            where = (path, lines[i][0])
            if key not in first_seen:
                first_seen[key] = where
            elif first_seen[key][0] != path or where[1] - first_seen[key][1] >= run:
                seen = first_seen[key]
                pairs.append((f"{seen[0]}:{seen[1]}", f"{path}:{where[1]}"))
    return pairs


def product_files() -> list[Path]:
    return [p for root in PRODUCT_ROOTS for p in sorted((REPO / root).rglob("*.py"))
            if "v1" not in p.relative_to(REPO).parts]


def test_no_logic_is_written_twice():
    pairs = repeated_runs(product_files())
    assert not pairs, "six-line runs repeated (put the logic in one place):\n" + "\n".join(f"{a} ~ {b}" for a, b in pairs)


def test_the_copy_check_finds_a_copy(tmp_path):
    body = "\n".join(f"    total = total + value_{i} * weight_{i}" for i in range(8))
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(f"def one():\n{body}\n")
    b.write_text(f'"""Docstring."""\n\nimport os\n\n\ndef two():\n    # a comment\n{body}\n')
    assert repeated_runs([a, b])
    b.write_text(f"def two():\n{body.replace('weight_3', 'other')}\n")
    assert not repeated_runs([a, b])


def _layout_block(text: str, heading: str) -> str:
    section = text.split(heading, 1)[1]
    return section.split("```", 2)[1]


def _modules_of(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name != "v1"}


def test_the_readme_layout_and_architecture_doc_match_the_tree():
    """Every room and module of the library and every service named in both; every path the README names exists."""
    readme = _layout_block((REPO / "README.md").read_text(encoding="utf-8"), "## What is where")
    architecture = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    words_readme = set(re.findall(r"[A-Za-z_][\w]*", readme))
    words_arch = set(re.findall(r"[A-Za-z_][\w]*", architecture))
    rooms = [folder for folder in sorted((REPO / "stablealign").iterdir())
             if (folder / "__init__.py").exists() and folder.name != "v1"]
    assert {"core", "nats", "serving", "llm", "sandbox", "training"} <= {room.name for room in rooms}
    expected = (_modules_of(REPO / "stablealign") | _modules_of(REPO / "stablealign_app") | _modules_of(REPO / "services")
                | {module for room in rooms for module in _modules_of(room)})
    assert not expected - words_readme, f"README layout misses {sorted(expected - words_readme)}"
    assert not expected - words_arch, f"docs/architecture.md misses {sorted(expected - words_arch)}"
    missing, parent = [], REPO
    for line in readme.splitlines():  # first column: paths; indented entries live in the folder above
        match = re.match(r"^( {0,2})(\S+(?: \S+)*?)(?:  |$)", line)
        if not match or not all("/" in name or name.endswith(".py") for name in match.group(2).split()):
            continue  # a description's continuation line
        base = REPO if not match.group(1) else parent
        for name in match.group(2).split():
            if not (base / name).exists():
                missing.append(str((base / name).relative_to(REPO)))
            elif not match.group(1):
                parent = REPO / name
    assert not missing, f"README layout names paths that do not exist: {missing}"
