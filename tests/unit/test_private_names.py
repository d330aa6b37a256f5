"""No module reaches into another's private names (issue 20: a client per service).

A leading underscore says "only this module relies on it": such a name may change or vanish with
any edit of its module. When another module imports it (``from stablealign_app.cli.sandbox import
_call``) or reads it through a module (``embedded._get_world``), the two modules are tied without
either saying so; the name should be public, or the caller should use the module's public API
(the services' clients). The scan reads the product code's syntax trees (generated protobuf code
excluded); dunder names (``__version__``) are public by convention and allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRODUCT_ROOTS = ("stablealign", "stablealign_app", "services", "bench")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(module: str | None, level: int, here: str, is_package: bool) -> str:
    """The module a ``from ... import`` names, relative imports resolved against ``here``."""
    if level == 0:
        return module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def private_uses(path: Path, root: Path, product: tuple[str, ...] = PRODUCT_ROOTS) -> list[str]:
    """``"file:line: what"`` for each private name of another module that ``path`` imports or reads.

    Imports: ``from M import _x`` and ``import M._x`` for any module M but this one. Reads:
    ``alias._x`` where ``alias`` was bound by an import of a product module (a module of
    ``product``) — the standard library's documented underscored names (``os._exit``) are not ours
    to judge.
    """
    here = _module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    module_aliases: set[str] = set()

    def ours(module: str) -> bool:
        return module.split(".")[0] in product

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node.module, node.level, here, path.name == "__init__.py")
            for alias in node.names:
                if _private(alias.name) and source != here:
                    found.append(f"{path}:{node.lineno}: from {source} import {alias.name}")
                elif ours(source):
                    module_aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(_private(part) for part in alias.name.split(".")):
                    found.append(f"{path}:{node.lineno}: import {alias.name}")
                elif ours(alias.name):
                    module_aliases.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases):
            found.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def product_files() -> list[Path]:
    return [p for root in PRODUCT_ROOTS for p in sorted((REPO / root).rglob("*.py"))
            if "v1" not in p.relative_to(REPO).parts]


def test_no_module_uses_another_modules_private_names():
    files = product_files()
    assert len(files) > 50  # the scan reads the product, not an empty folder
    found = [use for path in files for use in private_uses(path, REPO)]
    assert not found, "private names used from another module (make them public or use its API):\n" + "\n".join(found)


def test_the_scan_finds_each_kind_of_use(tmp_path):
    pkg = tmp_path / "stablealign_app" / "cli"
    pkg.mkdir(parents=True)
    (tmp_path / "stablealign_app" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "sandbox.py").write_text("def _call():\n    return _call\n\n\nclass A:\n    def f(self):\n"
                                    "        return self._x\n")
    uses = pkg / "resume.py"
    uses.write_text(
        "import os\n"
        "from stablealign_app.cli.sandbox import _call\n"
        "from .sandbox import _call as c2\n"
        "from . import sandbox\n"
        "import stablealign_app.cli._hidden\n"
        "from stablealign_app import embedded as emb\n"
        "x = sandbox._call, emb._get_world, os._exit, sandbox.__name__\n"
        "from stablealign_app.cli.sandbox import call_world, __doc__\n")
    found = sorted(use.split(": ", 1)[1] for use in private_uses(uses, tmp_path))
    assert found == sorted([
        "from stablealign_app.cli.sandbox import _call", "from stablealign_app.cli.sandbox import _call",
        "import stablealign_app.cli._hidden", "sandbox._call", "emb._get_world"])
    # A module's own private names, and attributes of objects (self._x), are its own business.
    assert private_uses(pkg / "sandbox.py", tmp_path) == []
