"""Paths named in a request, confined to the directories an operator configured.

A world spec names its question and prior files, a training job its data, model and output
directory; whoever can send the request chooses the path. Without a check, a ``questions_path`` of
``/etc/passwd`` publishes that file's lines as questions (and sends them to the LLM), and a job's
output directory may overwrite anything the service can write. Both services therefore accept
a path only inside their configured roots:

- ``confined_path`` (a path on this machine): resolved with ``Path.resolve()`` — ``..`` and every
  symlink followed — then required to be inside one resolved root (``Path.is_relative_to``), so a
  symlink inside a root that points out of it is refused like the path it points to;
- ``confined_pod_path`` (a path on another machine's volume, e.g. a training pod's PVC, which this
  process cannot see): normalised lexically, ``..`` may not climb out of the root.

Both raise ValidationError naming the request's field (INVALID_ARGUMENT), never a traceback.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from pathlib import Path

from stablealign.core.errors import ValidationError


def resolved_roots(roots: Iterable[str | Path]) -> tuple[Path, ...]:
    """Each root as an absolute path with its symlinks resolved ('~' expanded); empty entries dropped."""
    return tuple(Path(os.path.expanduser(str(root))).resolve() for root in roots if str(root).strip())


def confined_path(path: str | Path, roots: Iterable[str | Path], field: str, *, setting: str = "") -> Path:
    """``path`` resolved (relative to the working directory), if it lies inside one of ``roots``.

    ValidationError naming ``field`` (and the ``setting`` that holds the roots) otherwise; a path
    with a NUL byte or one that cannot be resolved is refused the same way.
    """
    text = str(path)
    where = f" ({setting})" if setting else ""
    allowed = resolved_roots(roots)
    if not text.strip():
        raise ValidationError(f"{field} is empty")
    if "\x00" in text:
        raise ValidationError(f"{field}: a path may not contain a NUL byte")
    try:
        resolved = Path(os.path.expanduser(text)).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ValidationError(f"{field} {text[:200]!r} cannot be resolved: {exc}") from None
    if not any(resolved.is_relative_to(root) for root in allowed):
        shown = ", ".join(str(r) for r in allowed) or "none configured"
        raise ValidationError(f"{field} {text[:200]!r} is outside the allowed directories{where}: {shown}")
    return resolved


def confined_pod_path(path: str, root: str, field: str, *, allowed: Iterable[str] = ()) -> str:
    """A path on a remote volume mounted at ``root``: relative paths are taken under it, ``..`` may not
    leave it, and an absolute path must be under ``root`` or one of ``allowed`` (absolute roots there)."""
    text = path.strip()
    if not text:
        raise ValidationError(f"{field} is required (a path under {root})")
    if "\x00" in text:
        raise ValidationError(f"{field}: a path may not contain a NUL byte")
    full = posixpath.normpath(text if text.startswith("/") else posixpath.join(root, text))
    roots = [posixpath.normpath(r) for r in (root, *allowed) if r.strip()]
    if not any(full == r or full.startswith(r.rstrip("/") + "/") for r in roots):
        raise ValidationError(f"{field} {text[:200]!r} is outside the allowed directories: {', '.join(roots)}")
    return full
