"""Rich live progress for the library's `log`/`progress` hooks (library code never renders)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli.render import console


class PhaseProgress:
    """One bar per phase; `log` shows the latest metrics next to it."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def _task(self, phase: str, total: int) -> TaskID:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total, metrics="")
        return self.tasks[phase]

    def log(self, phase: str, step: int, total: int, metrics: Mapping[str, float]) -> None:
        shown = "  ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "truncation_rate")
        )
        self.progress.update(self._task(phase, total), completed=step, total=total, metrics=shown)

    def step(self, phase: str, done: int, total: int) -> None:
        self.progress.update(self._task(phase, total), completed=done, total=total)


@contextmanager
def phase_progress() -> Iterator[PhaseProgress]:
    progress = Progress(
        TextColumn("[bold]{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        transient=False,
    )
    with progress:
        yield PhaseProgress(progress)
