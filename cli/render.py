"""Rich rendering for the CLI: errors, config tables, progress. Library code never renders."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer._click.globals import get_current_context

from cli import defence
from distill.errors import DistillError
from students.presets import StudentError
from teachers.protocol import TeacherError

# Under `accelerate launch` (torchrun sets RANK) every process runs the same command: only rank
# 0 prints tables, progress and results; errors are printed by whichever process hits them.
console = Console(quiet=os.environ.get("RANK", "0") != "0")
err_console = Console(stderr=True)

# Printed to a file or pipe (a log, `| tee`, CI), rich would lay out 80 columns and cut table
# cells to "...": there, unless COLUMNS is set, COLUMNS is set to 160 so that a log keeps every
# digit. After the consoles are built: a Console built with COLUMNS set fixes its width for good,
# one built without reads COLUMNS at each layout (so a caller's own COLUMNS still decides).
LOG_WIDTH = 160
if "COLUMNS" not in os.environ and not getattr(sys.stdout, "isatty", lambda: False)():
    os.environ["COLUMNS"] = str(LOG_WIDTH)

# Errors a user can fix: one line naming the problem and the fix, exit code 2, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    DistillError,
    TeacherError,
    StudentError,
    FileNotFoundError,
)

P = ParamSpec("P")
R = TypeVar("R")


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Every command's guard: parameters checked first (cli/defence.py), then the user-fixable
    errors raised inside become `error: ...` and exit code 2, and any other exception one
    `error: internal error ...` line, a crash log and exit code 1 (the last line of defence)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            ctx = get_current_context(silent=True)
            defence.check_params(ctx.command if ctx else None, kwargs)
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            print_error(str(e))
            raise typer.Exit(2) from None
        except OSError as e:
            if e.filename is None:  # not about a path the user gave: a bug, below
                crash(e, fn.__name__, kwargs)
            # a path: missing, unreadable, a folder, a full disk; never worth a traceback
            print_error(
                f"cannot use {e.filename} ({e.strerror or type(e).__name__}): check the path "
                "and its permissions, or pass another"
            )
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own: exit codes
            raise
        except Exception as e:
            crash(e, fn.__name__, kwargs)

    return wrapper


def print_error(message: str) -> None:
    # escape: a fix like pip install 'distill[peft]' is text, not rich markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def crash(e: Exception, command: str, kwargs: dict[str, Any]) -> NoReturn:
    """The last line of defence: log the traceback, print one line, exit 1."""
    run_dir = kwargs.get("run_dir")
    dry = bool(kwargs.get("dry_run"))  # a dry run writes nothing, not even a crash log there
    where = Path(run_dir) if isinstance(run_dir, Path | str) and not dry else None
    if defence.debug():
        err_console.print(escape("".join(traceback.format_exception(e))), highlight=False)
    print_error(defence.internal_error(e, command.removesuffix("_cmd"), where))
    raise typer.Exit(1) from None


def config_table(title: str, config: Any) -> Table:
    """A two-column table of a (frozen) dataclass config, as resolved."""
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("option")
    table.add_column("value")
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and hasattr(value, "max_tokens"):
            # A sampling preset runs with the config's --max-tokens: show that, not its default.
            effective = getattr(config, "max_tokens", None)
            if effective is not None:
                value = dataclasses.replace(value, max_tokens=effective)  # type: ignore[type-var]
        table.add_row(
            field.name, json.dumps(value, default=str) if not isinstance(value, str) else value
        )
    return table
