"""The images' build graph, checked without a Docker daemon (CI has none).

`make images` builds two targets of deploy/docker/Dockerfile (service, trainer). Checked here: the tags
it builds are the ones the kustomize overlays deploy; the stages reference only stages that exist; each
runtime is non-root on a pinned base; the build context lets in every package the image copies; and each
image's install list (the core dependencies + its extras) covers what its processes import at start —
run for real in a subprocess that refuses every installed package outside that list.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "docker" / "Dockerfile.dockerignore"
TARGETS = {"service": "stablealign", "trainer": "stablealign-trainer"}


def stages() -> dict[str, list[str]]:
    """Stage name -> its instruction lines (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or f"stage{len(out)}"
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def chain(name: str, graph: dict[str, list[str]]) -> list[str]:
    """The stage and the stages it is built FROM, nearest first."""
    names = [name]
    while True:
        parent = graph[names[-1]][0].split()[1]
        if parent not in graph:
            return names
        names.append(parent)


def test_make_images_builds_the_tags_the_overlays_deploy():
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed")
    dry = subprocess.run([make, "-n", "images"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    built = dict(re.findall(r"--target (\w+)\s+(?:\\\s+)?-t (\S+)", dry.replace("\\\n", " ")))
    assert set(built) == set(TARGETS), dry
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for overlay in ("dev", "gpu"):
        images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in yaml.safe_load(
            (ROOT / "deploy" / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())["images"]}
        for target, name in TARGETS.items():
            assert images[name] == built[target], (overlay, name)
            assert images[name].endswith(f":{version}")


def test_the_build_graph_is_sound():
    graph = stages()
    assert set(TARGETS) <= set(graph)
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text()).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), f"base not pinned: {base}"
    for name, lines in graph.items():
        for line in lines:
            source = re.search(r"COPY\s+--from=(\S+)", line)
            if source and source.group(1) != "shared":  # `shared` is the named build context (the data)
                assert source.group(1) in graph, f"{name}: COPY --from an unknown stage: {line}"
    for target in TARGETS:
        lines = [line for stage in chain(target, graph) for line in graph[stage]]
        users = [line for line in graph[target] if line.upper().startswith("USER ")]
        assert users and users[-1].split()[1].split(":")[0] not in ("0", "root"), f"{target} runs as root"
        assert any(line.startswith("ENTRYPOINT") for line in lines)
        assert any("/opt/venv" in line and "COPY --from=build-" in line for line in graph[target])
    ignored = DOCKERIGNORE.read_text().splitlines()
    copied = re.findall(r"^COPY (?!--from)(\S+) ", DOCKERFILE.read_text(), re.MULTILINE)
    for path in copied:
        assert f"!{path}" in ignored or f"!{path}/**" in ignored, f"{path} is copied but the build context leaves it out"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied into the images"


def install_list(target: str) -> list[str]:
    """What the target's virtual environment gets: torch and the project with its extras."""
    graph = stages()
    build_stage = next(line.split("--from=")[1].split()[0] for line in graph[target] if "/opt/venv /opt/venv" in line)
    run = " ".join(line for line in graph[build_stage] if line.startswith("RUN"))
    extras = re.search(r'"/src\[([a-z0-9,_-]*)\]"', run)
    assert extras, f"{build_stage}: no `pip install /src[extras]`"
    return [e for e in extras.group(1).split(",") if e]


STARTUP_CHECK = r"""
import importlib, importlib.abc, importlib.metadata as md, json, re, sys
from packaging.requirements import Requirement

extras = json.loads(sys.argv[1])
project = md.distribution("stable-align")

def closure(reqs):
    seen, todo = set(), list(reqs)
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
        for extra in req.extras:
            for raw in dist.requires or []:
                sub = Requirement(raw)
                if sub.marker is not None and sub.marker.evaluate({"extra": extra}):
                    todo.append(sub)
    return seen

wanted = []
for raw in project.requires or []:
    req = Requirement(raw)
    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
        wanted.append(req)
allowed = closure(wanted) | {"stable-align", "torch"}
blocked = set()
for module, dists in md.packages_distributions().items():
    if not any(re.sub(r"[-_.]+", "-", d).lower() in allowed for d in dists):
        blocked.add(module)
blocked -= {"stablealign", "stablealign_app", "services", "_distutils_hack", "pkg_resources", "setuptools"}

from importlib.machinery import PathFinder

class ImageOnly(importlib.abc.MetaPathFinder):
    # The path finder, blind to packages outside the image: as if they were not installed at all.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            return None
        return PathFinder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):  # metadata stays visible (version checks of allowed packages)
        return PathFinder.find_distributions(*args, **kwargs)

sys.meta_path[:] = [f for f in sys.meta_path if f is not PathFinder] + [ImageOnly()]
for service in ("agent", "observer", "world", "trainer"):
    importlib.import_module(f"services.{service}.main")
importlib.import_module("stablealign_app.cli.main")
import stablealign.training.train, stablealign.training.evaluate, stablealign.training.launch  # noqa: E401 - the training Jobs
from services.trainer.runners.kubernetes import KubernetesRunner  # noqa: F401 - the gpu overlay's runner
# The world's default embedder (offline = all-MiniLM-L6-v2 in-process) must load here.
from stablealign.llm.backends import make_embedder
from stablealign.v1 import common_pb2
embedder = make_embedder(common_pb2.ModelRef(backend="offline"))
import asyncio
vectors = asyncio.run(embedder.embed(["is it kind to share?"]))
print(json.dumps({"ok": True, "dim": int(vectors.shape[1]), "blocked": len(blocked)}))
"""


@pytest.mark.parametrize("target", list(TARGETS))
def test_each_image_installs_what_its_processes_import_at_start(target):
    extras = install_list(target)
    assert "ml" in extras, "the world's default embedder (all-MiniLM-L6-v2) runs in-process: the image needs ml"
    result = subprocess.run([sys.executable, "-c", STARTUP_CHECK, json.dumps(extras)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["dim"] == 384
    assert report["blocked"] > 0, "nothing was refused: the check would not notice a missing extra"


def test_the_check_notices_a_missing_extra():
    """Without the ml extra the default embedder cannot load: the same check must fail."""
    result = subprocess.run([sys.executable, "-c", STARTUP_CHECK, json.dumps(["k8s"])], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert "No module named" in result.stderr
