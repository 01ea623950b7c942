"""Rich rendering for the CLI: errors, config tables, progress. Library code never renders."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from distill.errors import DistillError
from students.presets import StudentError
from teachers.protocol import TeacherError

# Under `accelerate launch` (torchrun sets RANK) every process runs the same command: only rank
# 0 prints tables, progress and results; errors are printed by whichever process hits them.
console = Console(quiet=os.environ.get("RANK", "0") != "0")
err_console = Console(stderr=True)

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
    """Turn the user-fixable errors raised inside a command into `error: ...` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            # escape: a fix like pip install 'distill[peft]' is text, not rich markup
            err_console.print(
                f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None

    return wrapper


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
