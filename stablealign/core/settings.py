"""The process environment, read in one place: the lowest step of the settings layer.

Typed settings (``stablealign.core.config``) read their variables through ``process_environ``; so do the few
readers whose variable names are chosen at run time and so cannot be fields of a settings class (an LLM
endpoint's ``key_env``, the secret variables scrubbed from log lines). Every other reader asks a settings
class. This module imports nothing of the project, so the modules below ``stablealign.core.config`` (the
endpoints it validates, the redaction its logs use) can read through it without an import circle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def process_environ(given: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """``given`` (a test's or a caller's own mapping), else this process's environment."""
    return os.environ if given is None else given
