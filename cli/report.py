"""`distill report show RUN_DIR`: device-hours per phase and the held-out divergences by stage.

distill report show runs/default
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.app import app
from cli.render import console, user_errors
from distill.accounting import PHASES, GpuLedger
from distill.errors import DistillError
from distill.offpolicy.generate import Summary as GenSummary
from distill.rundir import read_json

report_app = typer.Typer(help="Show and compare run reports.", no_args_is_help=True)
app.add_typer(report_app, name="report")

STAGE_NAMES = {
    "before": "before",
    "after_offpolicy": "after off-policy",
    "after_onpolicy": "after on-policy",
}


def ledger_table(ledger: GpuLedger) -> Table:
    unit = "GPU-hours" if ledger.device.startswith("cuda") else "CPU device-hours"
    table = Table(title=f"Device time by phase ({ledger.device})")
    for col in ("phase", unit, "wall s", "tokens", "tokens/s", "TFLOPs"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    order = [p for p in PHASES if p in ledger.phases] + [
        p for p in ledger.phases if p not in PHASES
    ]
    for name in order:
        t = ledger.phases[name]
        table.add_row(
            name,
            f"{t.device_seconds / 3600:.5f}",
            f"{t.seconds:.1f}",
            f"{t.tokens:,}",
            f"{t.tokens / t.seconds:,.0f}" if t.seconds else "-",
            f"{t.flops / 1e12:.3f}",
        )
    table.add_row("[bold]total", f"[bold]{ledger.total_device_hours():.5f}", "", "", "", "")
    return table


def eval_table(evals: dict[str, dict[str, float]]) -> Table:
    table = Table(title="Held-out measurements by stage")
    metrics = sorted({k for v in evals.values() for k in v})
    table.add_column("stage")
    for m in metrics:
        table.add_column(m, justify="right")
    for stage, values in evals.items():
        table.add_row(
            STAGE_NAMES.get(stage, stage), *(f"{values.get(m, float('nan')):.4f}" for m in metrics)
        )
    return table


def verdict_table(summary: GenSummary) -> Table:
    table = Table(title=f"Teacher responses ({summary.rows} rows, {summary.kept} kept)")
    verdicts = sorted({v for counts in summary.by_verdict.values() for v in counts})
    table.add_column("mode")
    for v in verdicts:
        table.add_column(v, justify="right")
    for mode, counts in summary.by_verdict.items():
        table.add_row(mode, *(str(counts.get(v, 0)) for v in verdicts))
    return table


def render_run(run_dir: Path) -> None:
    path = run_dir / "ledger.json"
    if not path.exists():
        raise DistillError(f"{run_dir} has no ledger.json: is it a distill run directory?")
    console.print(ledger_table(GpuLedger.load(path)))
    if (run_dir / "eval.json").exists():
        console.print(eval_table(read_json(run_dir / "eval.json")))


@report_app.command("show")
@user_errors
def show(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Device-hours per phase and held-out measurements of one run."""
    render_run(run_dir)
