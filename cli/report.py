"""`distill report show RUN` and `distill report compare RUN...`: device-hours next to metrics.

distill report show runs/default
distill report compare runs/default runs/rl verl_grpo.json --baseline runs/rl --plot cmp.png
distill report compare runs/default runs/rl --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.eval import render_eval_dir
from cli.render import console, err_console, user_errors
from cli.root import app
from distill.accounting import PHASES, GpuLedger
from distill.errors import DistillError
from distill.report_schema import (
    SETUP_KEYS,
    RunReport,
    differing_eval_sets,
    differing_setups,
    export,
    from_run_dir,
    load,
    score_metrics,
)

report_app = typer.Typer(help="Show and compare run reports.", no_args_is_help=True)
app.add_typer(report_app, name="report")

STAGE_NAMES = {
    "before": "before",
    "after_offpolicy": "after off-policy",
    "after_onpolicy": "after on-policy",
    "after_rl": "after RL",
}


def phase_order(names: list[str] | set[str]) -> list[str]:
    return [p for p in PHASES if p in names] + sorted(p for p in names if p not in PHASES)


def ledger_table(ledger: GpuLedger) -> Table:
    unit = "GPU-hours" if ledger.device.startswith("cuda") else "CPU device-hours"
    held = f"{ledger.devices} device(s)" + (
        f" + {ledger.teacher_devices} teacher device(s) reserved" if ledger.teacher_devices else ""
    )
    table = Table(title=f"{unit} by phase ({ledger.device}; {held})")
    for col in ("phase", "hours", "wall s", "tokens", "tokens/s", "TFLOPs", "MFU"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    mfu = ledger.mfu()
    for name in phase_order(set(ledger.phases)):
        t = ledger.phases[name]
        share = mfu.get(name)
        table.add_row(
            name,
            f"{t.device_seconds / 3600:.5f}",
            f"{t.seconds:.1f}",
            f"{t.tokens:,}",
            f"{t.tokens / t.seconds:,.0f}" if t.seconds and t.tokens else "-",
            f"{t.flops / 1e12:.3f}",
            f"{share:.1%}" if share is not None else ("CPU" if unit.startswith("CPU") else "-"),
        )
    table.add_row("[bold]total", f"[bold]{ledger.total_device_hours():.5f}", "", "", "", "", "")
    if ledger.busy:  # metered per device group (ledgers from before had no such record)
        busy = ", ".join(f"{g} {f:.0%}" for g, f in ledger.busy_fractions().items())
        table.caption = f"busy (share of {ledger.wall_seconds():.1f} s wall-clock): {busy}"
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


def warn(message: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def render_run(run_dir: Path) -> None:
    """Ledger and evaluations of one run; says which phases were not metered."""
    report = from_run_dir(run_dir)
    path = run_dir / "ledger.json"
    if not path.exists() and not report.evals:
        raise DistillError(f"{run_dir} has no ledger.json and no eval.json: is it a distill run?")
    if path.exists():
        console.print(ledger_table(GpuLedger.load(path)))
    if report.evals:
        console.print(eval_table(report.evals))
    render_eval_dir(run_dir)  # results of `distill eval`: pass@k by mode, budget curves
    for problem in report.problems:
        warn(problem)


@report_app.command("show")
@user_errors
def show(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Device-hours, tokens, FLOPs and MFU per phase, and held-out measurements of one run."""
    render_run(run_dir)


def hours_text(hours: float) -> str:
    """Thousands of GPU-hours and hundredths of a CPU-hour both stay readable."""
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.4f}"


def ratios(reports: list[RunReport], baseline: RunReport) -> list[float | None]:
    base = baseline.total_device_hours
    return [
        r.total_device_hours / base if base and r.total_device_hours is not None else None
        for r in reports
    ]


def compare_table(reports: list[RunReport], baseline: RunReport, show_eval_sets: bool) -> Table:
    """Rows in the shape of the Qwen3 report's Table 21: method, metrics, device-hours, ratio."""
    units = sorted({r.unit for r in reports if r.device_hours})
    unit = units[0] if len(units) == 1 else "device-hours"
    table = Table(title=f"Methods compared ({unit}; ratio to {baseline.name})")
    metrics = score_metrics(reports)
    phases = phase_order({p for r in reports for p in r.device_hours})
    for col in ["run", "method", *metrics, *phases, f"total {unit}", "ratio"]:
        table.add_column(col, justify="left" if col in ("run", "method") else "right")
    if show_eval_sets:
        table.add_column("eval set")
    for r, ratio in zip(reports, ratios(reports, baseline), strict=True):
        final = r.final
        total = r.total_device_hours
        cells = [
            r.name + (" (baseline)" if r is baseline else ""),
            r.method,
            *(f"{final[m]:.3f}" if m in final else "-" for m in metrics),
            *(hours_text(r.device_hours[p]) if p in r.device_hours else "-" for p in phases),
            hours_text(total) if total is not None else "unknown",
            f"{ratio:.3g}x" if ratio is not None else "-",
        ]
        if show_eval_sets:
            cells.append(json.dumps(r.eval_set, sort_keys=True))
        table.add_row(*cells)
    return table


def setup_table(reports: list[RunReport], differing: set[str]) -> Table:
    """How each run was built (manifest.json), side by side; differing columns in yellow."""
    table = Table(title="How each run was built (manifest.json)")
    keys = [k for k in SETUP_KEYS if any(k in r.setup for r in reports)]
    table.add_column("run")
    for k in keys:
        table.add_column(f"[yellow]{k} (differs)" if k in differing else k)
    for r in reports:
        table.add_row(r.name, *(r.setup.get(k, "-") for k in keys))
    return table


def setup_warnings(reports: list[RunReport]) -> list[str]:
    """One warning per setup key two runs differ in, naming each run's value and the fix."""
    return [
        f"the runs differ in {key.replace('_', ' ')} ("
        + "; ".join(f"{name}: {value}" for name, value in stated)
        + f"): their device-hours compare different machinery, not only the methods; "
        f"build both with {SETUP_KEYS[key]}"
        for key, stated in differing_setups(reports).items()
    ]


def resolve_baseline(reports: list[RunReport], baseline: Path | None) -> RunReport:
    if baseline is None:
        return reports[0]
    for r in reports:
        if Path(r.source).resolve() == baseline.resolve():
            return r
    extra = load(baseline)
    reports.append(extra)
    return extra


@report_app.command("compare")
@user_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="run directories and/or report .json files")],
    baseline: Annotated[
        Path | None, typer.Option(help="run or report the ratios are taken to (default: first)")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="write metric/KL vs device-hours and phase bars (PNG)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Compare distillation runs, RL runs and imported RL reports by one meter."""
    reports = [load(p) for p in runs]
    base = resolve_baseline(reports, baseline)
    warnings = [p for r in reports for p in r.problems]
    differing = differing_eval_sets(reports)
    if differing:
        warnings.append(
            f"the runs were evaluated on different sets (they differ in {', '.join(differing)}): "
            "their metrics are shown side by side but do not compare directly"
        )
    units = {r.unit for r in reports if r.device_hours}
    if len(units) > 1:
        warnings.append(
            f"the runs were metered on different devices ({', '.join(sorted(units))}): "
            "their device-hours do not compare directly"
        )
    warnings += setup_warnings(reports)
    if base.total_device_hours is None:
        warnings.append(f"baseline {base.name} has no metered device-hours: no ratios")
    if plot is not None:
        from cli.report_plot import write_plot  # matplotlib loads only when asked

        write_plot(reports, plot)
    if as_json:
        out: dict[str, Any] = {
            "baseline": base.name,
            "runs": [
                {"name": r.name, "source": r.source, "ratio": ratio, **export(r)}
                for r, ratio in zip(reports, ratios(reports, base), strict=True)
            ],
            "warnings": warnings,
        }
        typer.echo(json.dumps(out, indent=2))
        return
    console.print(compare_table(reports, base, show_eval_sets=bool(differing)))
    if any(r.setup for r in reports):
        console.print(setup_table(reports, set(differing_setups(reports))))
    for w in warnings:
        warn(w)
    if plot is not None:
        console.print(f"plot written to {plot}")
