"""Process-independent hashing for seeds and tie-breaks.

Two replicas (or two runs) must derive the same seed for the same step, so nothing here uses
Python's ``hash()``, which is salted per process.
"""

from __future__ import annotations

import hashlib


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of the parts' string forms, the same in every process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")
