"""The figure of `distill report compare --plot FILE.png`: metrics and KL against cumulative
device-hours, and stacked device-hours per phase for each run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from distill.accounting import PHASES  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.report_schema import RunReport, kl_metrics, score_metrics  # noqa: E402


def write_plot(reports: list[RunReport], path: Path) -> None:
    """One PNG: [score metrics vs device-hours] [KL vs device-hours, when any] [phase bars]."""
    if path.suffix.lower() != ".png":
        raise DistillError(f"--plot {path}: write a .png file")
    scores = [m for m in score_metrics(reports) if any(m in p for r in reports for p in r.curve)]
    kls = kl_metrics(reports)
    panels = 2 + bool(kls)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax_score, ax_bars = axes[0][0], axes[0][-1]
    for r in reports:
        for m in scores:
            points = [(p["device_hours"], p[m]) for p in r.curve if m in p]
            if points:
                xs, ys = zip(*points, strict=True)
                ax_score.plot(xs, ys, marker="o", label=f"{r.name}: {m}")
    ax_score.set_xlabel("cumulative device-hours")
    ax_score.set_ylabel("score")
    ax_score.set_title("evaluation metrics")
    if scores:
        ax_score.legend(fontsize=7)
    if kls:
        ax_kl = axes[0][1]
        for r in reports:
            for m in kls:
                points = [(p["device_hours"], p[m]) for p in r.curve if m in p]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax_kl.plot(xs, ys, marker=".", label=f"{r.name}: {m}")
        ax_kl.set_xlabel("cumulative device-hours")
        ax_kl.set_ylabel("nats / token")
        ax_kl.set_title("divergence to the teacher")
        ax_kl.legend(fontsize=7)
    phases = [p for p in PHASES if any(p in r.device_hours for r in reports)]
    phases += sorted({p for r in reports for p in r.device_hours} - set(phases))
    bottoms = [0.0] * len(reports)
    names = [r.name for r in reports]
    for phase in phases:
        heights = [r.device_hours.get(phase, 0.0) for r in reports]
        ax_bars.bar(names, heights, bottom=bottoms, label=phase)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax_bars.set_ylabel("device-hours")
    ax_bars.set_title("device-hours by phase")
    ax_bars.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
