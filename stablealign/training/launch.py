"""The training Job's entry point: checks the job's configuration, then becomes torchrun.

``python -m stablealign.training.launch [torchrun options] -- [training flags]``

Why not torchrun directly: torchrun exits 1 whatever its workers' exit codes were, so a Kubernetes
Job could not tell a configuration error (a bad flag or value, a missing model, a malformed data file:
no retry can fix it) from a crash, an OOM kill or a lost node (a retry resumes from the last
checkpoint). This process checks the training flags exactly as the training command would — the same
generated options, ``StableAlignmentConfig``'s checks, the model directory, every line of the data —
and on an error prints one ``error: ...`` line and exits with ``EXIT_CONFIG_ERROR`` (2, the training
command's own code for the same errors and click's for usage errors); the Job's ``podFailurePolicy``
fails the Job on that code at once instead of retrying it. Otherwise it replaces itself (exec) with
``python -m torch.distributed.run [torchrun options] -m stablealign.training.train [training flags]``,
so signals, logs and the exit code are torchrun's: 0 done, 1 a worker failed (retried by the Job).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from stablealign.training.cli import train_module_command

# The exit code of a configuration the training cannot run with (documented in docs/deploy.md; the
# Job template's podFailurePolicy fails the Job on it).
EXIT_CONFIG_ERROR = 2
TRAIN_MODULE = "stablealign.training.train"


def torchrun_argv(torchrun_options: list[str], train_args: list[str]) -> list[str]:
    """The command this process becomes: torchrun through the running interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_options, "-m", TRAIN_MODULE, *train_args]


def check(train_args: list[str]) -> int:
    """Runs ``python -m stablealign.training.train --check-only`` in this process; returns its exit code."""
    try:
        train_module_command().main(args=[*train_args, "--check-only"], prog_name=f"python -m {TRAIN_MODULE}")
    except SystemExit as exc:  # click's standalone mode always ends with one
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> NoReturn:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m stablealign.training.launch [torchrun options] -- [training flags]", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    split = argv.index("--")
    torchrun_options, train_args = argv[:split], argv[split + 1:]
    code = check(train_args)
    if code != 0:
        # click reports usage errors with 2, the training command its config errors with 2: both mean
        # "this configuration cannot run", which is what the Job's failure policy looks for.
        sys.exit(EXIT_CONFIG_ERROR)
    command = torchrun_argv(torchrun_options, train_args)
    print(f"launch: configuration checked; exec {' '.join(command[1:4])} {' '.join(torchrun_options)}",
          file=sys.stderr, flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
