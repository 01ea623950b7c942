"""distill's command line. The only package that renders with rich.

distill run                      # the whole pipeline on the embedded default
distill --help

`main` is the `distill` command. The app and its commands are imported on first use of `cli.app`
(`from cli import app`), so `main` can rerun the process on tcmalloc before torch is loaded.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer


def rerun_on_tcmalloc() -> None:
    """Replace this process by the same command on tcmalloc, where students/memory.py's
    `preload_command` asks for it (a CPU host with tcmalloc installed, `DISTILL_MALLOC` unset):
    the same pid, arguments and streams, so `accelerate launch` and signals see no difference."""
    from students.memory import preload_command

    try:
        rerun = preload_command(os.environ, sys.orig_argv, sys.executable)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if rerun is not None:
        argv, env = rerun
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(argv[0], argv, env)


def main() -> None:
    """The `distill` command."""
    rerun_on_tcmalloc()
    from cli.commands import app

    app()


def __getattr__(name: str) -> typer.Typer:
    if name == "app":
        from cli.commands import app

        return app
    raise AttributeError(f"module 'cli' has no attribute {name!r}")
