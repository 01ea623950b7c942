"""The first and the last line of defence of every command (`cli.render.user_errors` runs both).

First: every parameter a command receives is checked by its type before the command's body runs:
a float must be finite (typer's min/max let NaN through), an int must fit in int64 and, unless
the command declares a typer `min` below 0, be >= 0, and a string must hold no NUL character (no
path or column can). Typer has already checked choices (Literal types) and declared min/max; the
command's Config checks ranges and combinations in its `__post_init__` (distill/validation.py).

Last: an exception that is not one of distill's own errors.

It ends the command with one line, `error: internal error during <phase>: <type>: <message>`,
naming RUN_DIR/crash-<timestamp>.log, which holds the full traceback; exit code 1. Nothing
already written is touched: every file of a run is replaced atomically (distill/rundir.py), so a
crash leaves the old file or the new one, and the log is a new file. `DISTILL_DEBUG=1` also
prints the traceback on the console.

The phase is the ledger phase the exception passed through (`with ledger.phase("teacher.score")`
records its name on it), else the command's setup: what the user needs to tell "the
teacher server died while scoring" from "a model failed to load".
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distill.errors import DistillError

DEBUG_VAR = "DISTILL_DEBUG"


def debug() -> bool:
    return os.environ.get(DEBUG_VAR, "") not in ("", "0")


INT64 = 2**63


def check_params(command: Any, values: Mapping[str, Any]) -> None:
    """Refuse non-finite floats, ints outside int64 (or negative), NUL characters; see above."""
    params = {p.name: p for p in getattr(command, "params", [])}
    for name, value in values.items():
        for v in value if isinstance(value, list | tuple) else (value,):
            check_param(name, v, params.get(name))


def check_param(name: str, value: Any, param: Any) -> None:
    """One value of parameter `name` (`param`: its typer parameter, for its flag and `min`)."""
    opts = getattr(param, "opts", None) or [f"--{name.replace('_', '-')}"]
    opt = opts[0]
    if isinstance(value, float) and not math.isfinite(value):
        raise DistillError(f"{opt} {value} is not finite: pass a finite number")
    if isinstance(value, int) and not isinstance(value, bool):
        low = getattr(param, "min", None)
        floor = low if isinstance(low, int) and low < 0 else 0
        if not floor <= value < INT64:
            raise DistillError(f"{opt} {value} must lie in [{floor}, 2**63): pass a value in it")
    if isinstance(value, str | Path) and "\x00" in str(value):
        raise DistillError(f"{opt} holds a NUL character: pass plain text")


def phase_of(exc: BaseException, command: str) -> str:
    """`command (ledger phase)` of the innermost ledger phase the exception left, or
    `command setup` (`GpuLedger.phase` records its name on the exception)."""
    found = exc.__dict__.get("distill_phase")
    return f"{command} ({found})" if isinstance(found, str) else f"{command} setup"


def write_log(exc: BaseException, phase: str, run_dir: Path | None) -> Path:
    """Write the traceback to RUN_DIR/crash-<timestamp>.log (or the temp folder); its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    rank = os.environ.get("RANK")
    name = f"crash-{stamp}-{os.getpid()}" + (f"-rank{rank}" if rank else "") + ".log"
    text = (
        f"distill: internal error during {phase}\n"
        f"time (UTC): {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}\n\n"
        + "".join(traceback.format_exception(exc))
    )
    for folder in (run_dir, Path(tempfile.gettempdir())):
        if folder is None or not folder.is_dir():
            continue  # never create a run directory only to hold a crash log
        try:
            path = folder / name
            with open(path, "x") as f:  # a new file: nothing already written is replaced
                f.write(text)
            return path
        except OSError:
            continue
    raise OSError("no writable folder for the crash log")


def internal_error(exc: BaseException, command: str, run_dir: Path | None) -> str:
    """The one line the user sees; writes the crash log first."""
    phase = phase_of(exc, command)
    message = " ".join(str(exc).split()) or "(no message)"
    if len(message) > 300:
        message = message[:300] + " ..."
    try:
        where = f"traceback in {write_log(exc, phase, run_dir)}"
    except OSError:
        where = f"no crash log could be written; rerun with {DEBUG_VAR}=1 to see the traceback"
    return (
        f"internal error during {phase}: {type(exc).__name__}: {message} ({where}); this is a "
        f"bug in distill: please report it with that log (rerun with {DEBUG_VAR}=1 to print it)"
    )
