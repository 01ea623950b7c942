"""Run reports for `distill report compare`: read from a run directory, or imported as JSON.

A report from another RL framework (verl, OpenRLHF, NeMo-RL, TRL, ...) is compared by writing
one JSON object in this schema (docs/accounting.md has an example):

    schema              "distill.report/1"                                   required
    method              str, the row label, e.g. "GRPO (verl)"                required
    device              str: "H100", "H200", "A100", "L40S", another GPU, "cpu"  required
    device_hours        {phase: number >= 0}; ledger phase names where they apply  required
    eval                {stage: {metric: number}}; the last stage is compared  required
    total_device_hours  number: must equal the sum of device_hours within 1%   optional
    eval_set            {key: str | number}, e.g. {"prompts": 30, "seed": 0}   optional
    curve               [{"device_hours": number, metric: number, ...}]      optional
    setup               {key: str}: how the run was built; keys as SETUP_KEYS    optional
    notes               str                                                   optional

Metric names follow distill's: `pass@1_think`, `pass@64_no_think`, `accuracy_think`, ... A field
that does not match raises a DistillError naming the field. `export` writes any report in the
same schema, so a distill run can itself be re-imported elsewhere.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.accounting import unit
from distill.errors import DistillError
from distill.rundir import read_json, read_metrics

SCHEMA = "distill.report/1"
REQUIRED = ("schema", "method", "device", "device_hours", "eval")
OPTIONAL = ("total_device_hours", "eval_set", "curve", "setup", "notes")
# How a run was built, from manifest.json's `setup` of its training phase; `report compare` sets
# them side by side and warns where two runs differ (value: what to align).
SETUP_KEYS = {
    "sampler": "the same --sampler, engine dtype and --sync-every",
    "precision": "the same training dtype",
    "loss_path": "the same --fused-loss setting",
    "processes": "the same accelerate config",
    "lora": "the same --lora-rank",
    "allocator": "the same host allocator (DISTILL_MALLOC, students/memory.py)",
}
TRAINING_PHASES = ("offpolicy", "onpolicy", "rl")  # the last one a run holds is its method
ALIASES = {  # what other frameworks call our fields
    "gpu_hours": "device_hours",
    "total_gpu_hours": "total_device_hours",
    "metrics": "eval",
    "evals": "eval",
    "name": "method",
    "gpu": "device",
}

# Which ledger phases each config.json section produces when it runs.
EXPECTED_PHASES = {
    "generate": ("teacher.generate",),
    "offpolicy": ("student.train",),
    "onpolicy": ("student.sample", "teacher.score", "student.train"),
    "eval": ("eval",),
    "rl": ("student.sample", "student.train", "eval"),
}
SCORE_METRIC = re.compile(r"^(pass@\d+|accuracy)(_|$)")  # what the comparison table shows
KL_METRIC = re.compile(r"(kl|divergence)", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class RunReport:
    name: str  # short label: the run directory's name, or the imported file's stem
    method: str
    source: str
    device: str
    unit: str
    device_hours: dict[str, float]  # phase -> device-hours; empty when nothing was metered
    evals: dict[str, dict[str, float]]  # stage -> metric -> value, in measurement order
    eval_set: dict[str, Any]
    curve: list[dict[str, float]]  # points with "device_hours" and metric values
    mfu: dict[str, float | None] = field(default_factory=dict)
    setup: dict[str, str] = field(default_factory=dict)  # SETUP_KEYS -> value, those known
    problems: list[str] = field(default_factory=list)  # what is missing, said in one line each

    @property
    def total_device_hours(self) -> float | None:
        return sum(self.device_hours.values()) if self.device_hours else None

    @property
    def final(self) -> dict[str, float]:
        """The metrics of the last measured stage."""
        return dict(list(self.evals.values())[-1]) if self.evals else {}


def _method(configs: dict[str, Any]) -> str:
    if "rl" in configs:
        return "RL (GRPO)"
    parts = [
        label
        for key, label in (("offpolicy", "off-policy"), ("onpolicy", "on-policy"))
        if key in configs
    ]
    return " + ".join(parts) + " distillation" if parts else "distill run"


def setup_of(phase: dict[str, Any]) -> dict[str, str]:
    """A phase's manifest setup (distill/manifest.py) as the SETUP_KEYS values compared."""
    out: dict[str, str] = {}
    if "sampler" in phase:  # its engine's precision belongs to it: off-policy runs have none
        parts = [str(phase["sampler"])]
        if "sampler_dtype" in phase:
            parts.append(str(phase["sampler_dtype"]))
        if "sync_every" in phase:
            parts.append(f"sync every {phase['sync_every']}")
        out["sampler"] = ", ".join(parts)
    if "dtype" in phase:
        precision = str(phase["dtype"])
        if phase.get("mixed_precision", "no") != "no":
            precision += f" (mixed {phase['mixed_precision']})"
        out["precision"] = precision
    if "loss_path" in phase:
        out["loss_path"] = str(phase["loss_path"])
    if "layout" in phase:
        out["processes"] = str(phase["layout"])
    if "lora_rank" in phase:
        rank = int(phase["lora_rank"])
        out["lora"] = f"rank {rank}" if rank else "none (every weight)"
    if "allocator" in phase:  # CPU runs: tcmalloc was 1.3x faster than glibc at Qwen3-0.6B size
        out["allocator"] = str(phase["allocator"])
    return out


def run_setup(run_dir: Path) -> dict[str, str]:
    """The setup of the run's method: its last training phase in manifest.json ({} if none)."""
    path = run_dir / "manifest.json"
    phases = read_json(path, default={}).get("setup", {})
    ran = [p for p in TRAINING_PHASES if p in phases]
    return setup_of(phases[ran[-1]]) if ran else {}


def from_run_dir(run_dir: Path) -> RunReport:
    """A report of a distill run directory: ledger.json, eval.json, config.json, metrics.jsonl."""
    if not run_dir.is_dir():
        raise DistillError(f"{run_dir} is not a directory: pass a run directory or a report .json")
    configs = read_json(run_dir / "config.json", default={})
    evals = read_json(run_dir / "eval.json", default={})
    expected = list(dict.fromkeys(p for k in configs for p in EXPECTED_PHASES.get(k, ())))
    problems: list[str] = []
    if (run_dir / "ledger.json").exists():
        ledger = read_json(run_dir / "ledger.json")
        hours = {str(k): float(v) for k, v in ledger.get("device_hours", {}).items()}
        device, mfu = str(ledger["device"]), dict(ledger.get("mfu", {}))
        missing = [p for p in expected if p not in hours]
        if missing:
            problems.append(
                f"{run_dir}: ledger.json has no {', '.join(missing)} phase: "
                "its total leaves that work out"
            )
        marks = {str(k): float(v) for k, v in ledger.get("marks", {}).items()}
        points = [float(v) for v in ledger.get("eval_points", [])]
    else:
        hours, device, mfu, marks, points = {}, "unknown", {}, {}, []
        problems.append(
            f"{run_dir}: no ledger.json, so no phase was metered "
            f"({', '.join(expected) or 'no phase recorded in config.json'}): device-hours unknown"
        )
    if not evals and not any((run_dir / "eval").glob("*.json")):  # `distill eval` results
        problems.append(f"{run_dir}: no eval.json: no evaluation metrics to compare")
    stage_hours = {s: marks[s] for s in evals if s in marks}
    if len(stage_hours) < len(evals) and len(points) == len(evals):
        stage_hours = dict(zip(evals, points, strict=True))  # one eval round per stage, in order
    curve = [{"device_hours": h, **evals[s]} for s, h in stage_hours.items()]
    curve += [
        {k: float(v) for k, v in r.items() if isinstance(v, int | float)}
        for r in read_metrics(run_dir)
        if "device_hours" in r and not str(r.get("phase", "")).endswith(".eval")
    ]
    eval_set = {k: v for k, v in configs.get("eval", {}).items() if k != "top_k"}
    if (run_dir / "eval_set.json").exists():
        eval_set.update(read_json(run_dir / "eval_set.json"))
    return RunReport(
        name=run_dir.name,
        method=_method(configs),
        source=str(run_dir),
        device=device,
        unit=unit(device),
        device_hours=hours,
        evals=evals,
        eval_set=eval_set,
        curve=sorted(curve, key=lambda p: p["device_hours"]),
        mfu=mfu,
        setup=run_setup(run_dir),
        problems=problems,
    )


def _number(value: Any, where: str, source: str, minimum: float | None = None) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise DistillError(
            f"{source}: field {where!r} must be a finite number{bound}, got {value!r} "
            f"(schema {SCHEMA}, docs/accounting.md)"
        )
    return float(value)


def _object(value: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DistillError(
            f"{source}: field {where!r} must be a JSON object, got {type(value).__name__} "
            f"(schema {SCHEMA}, docs/accounting.md)"
        )
    return value


def validate(data: Any, source: str) -> RunReport:
    """An imported report as a RunReport, or a DistillError naming the first wrong field."""
    data = _object(data, "(top level)", source)
    for key in data:
        if key not in REQUIRED + OPTIONAL:
            near = (
                [ALIASES[key]]
                if key in ALIASES
                else difflib.get_close_matches(key, REQUIRED + OPTIONAL, n=1)
            )
            hint = f": did you mean {near[0]!r}?" if near else f"; fields are {REQUIRED + OPTIONAL}"
            raise DistillError(f"{source}: unknown field {key!r}{hint}")
    for key in REQUIRED:
        if key not in data:
            raise DistillError(f"{source}: required field {key!r} is missing (schema {SCHEMA})")
    if data["schema"] != SCHEMA:
        raise DistillError(f"{source}: field 'schema' must be {SCHEMA!r}, got {data['schema']!r}")
    for key in ("method", "device") + (("notes",) if "notes" in data else ()):
        if not isinstance(data[key], str) or not data[key].strip():
            raise DistillError(f"{source}: field {key!r} must be a non-empty string")
    hours = {
        str(phase): _number(v, f"device_hours.{phase}", source, minimum=0.0)
        for phase, v in _object(data["device_hours"], "device_hours", source).items()
    }
    if not hours:
        raise DistillError(f"{source}: field 'device_hours' is empty: give at least one phase")
    if "total_device_hours" in data:
        total = _number(data["total_device_hours"], "total_device_hours", source, minimum=0.0)
        if abs(total - sum(hours.values())) > 0.01 * max(total, 1e-12):
            raise DistillError(
                f"{source}: field 'total_device_hours' is {total:g} but device_hours sum to "
                f"{sum(hours.values()):g}: fix either (they must agree within 1%)"
            )
    evals: dict[str, dict[str, float]] = {}
    for stage, metrics in _object(data["eval"], "eval", source).items():
        evals[str(stage)] = {
            str(m): _number(v, f"eval.{stage}.{m}", source)
            for m, v in _object(metrics, f"eval.{stage}", source).items()
        }
    if not evals:
        raise DistillError(f"{source}: field 'eval' is empty: give at least one stage of metrics")
    eval_set = _object(data.get("eval_set", {}), "eval_set", source)
    curve_in = data.get("curve", [])
    if not isinstance(curve_in, list):
        raise DistillError(f"{source}: field 'curve' must be a list of objects")
    curve = []
    for i, point in enumerate(curve_in):
        point = _object(point, f"curve[{i}]", source)
        if "device_hours" not in point:
            raise DistillError(f"{source}: field 'curve[{i}].device_hours' is missing")
        curve.append({str(k): _number(v, f"curve[{i}].{k}", source) for k, v in point.items()})
    setup = {}
    for key, value in _object(data.get("setup", {}), "setup", source).items():
        if key not in SETUP_KEYS:
            near = difflib.get_close_matches(key, SETUP_KEYS, n=1)
            hint = f": did you mean {near[0]!r}?" if near else f"; keys are {tuple(SETUP_KEYS)}"
            raise DistillError(f"{source}: unknown field 'setup.{key}'{hint}")
        if not isinstance(value, str) or not value.strip():
            raise DistillError(f"{source}: field 'setup.{key}' must be a non-empty string")
        setup[key] = value
    device = str(data["device"])
    return RunReport(
        name=Path(source).stem,
        method=str(data["method"]),
        source=source,
        device=device,
        unit=unit(device),
        device_hours=hours,
        evals=evals,
        eval_set=dict(eval_set),
        curve=sorted(curve, key=lambda p: p["device_hours"]),
        setup=setup,
    )


def load(path: Path) -> RunReport:
    """A run directory, or a report .json in the schema above."""
    if path.is_dir():
        return from_run_dir(path)
    if path.suffix == ".json" and path.exists():
        return validate(read_json(path), str(path))
    raise DistillError(f"{path} is neither a run directory nor a report .json file")


def export(report: RunReport) -> dict[str, Any]:
    """The report in the import schema: what `validate` reads back."""
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "method": report.method,
        "device": report.device,
        "device_hours": dict(report.device_hours),
        "eval": {s: dict(m) for s, m in report.evals.items()},
        "eval_set": dict(report.eval_set),
        "curve": [dict(p) for p in report.curve],
    }
    if report.total_device_hours is not None:
        out["total_device_hours"] = report.total_device_hours
    if report.setup:
        out["setup"] = dict(report.setup)
    return out


def differing_eval_sets(reports: list[RunReport]) -> list[str]:
    """Keys on which two reports' evaluation sets disagree (only keys both of them state)."""
    keys: set[str] = set()
    for i, a in enumerate(reports):
        for b in reports[i + 1 :]:
            keys |= {k for k in set(a.eval_set) & set(b.eval_set) if a.eval_set[k] != b.eval_set[k]}
    return sorted(keys)


def differing_setups(reports: list[RunReport]) -> dict[str, list[tuple[str, str]]]:
    """SETUP_KEYS on which the reports that state them disagree -> (run name, value) of each."""
    out: dict[str, list[tuple[str, str]]] = {}
    for key in SETUP_KEYS:
        stated = [(r.name, r.setup[key]) for r in reports if key in r.setup]
        if len({value for _, value in stated}) > 1:
            out[key] = stated
    return out


def score_metrics(reports: list[RunReport]) -> list[str]:
    """pass@k and accuracy metrics any report's last stage holds, sorted by mode then k."""
    names = {m for r in reports for m in r.final if SCORE_METRIC.match(m)}
    return sorted(names, key=lambda m: (m.split("_", 1)[-1], m))


def kl_metrics(reports: list[RunReport]) -> list[str]:
    return sorted({m for r in reports for p in r.curve for m in p if KL_METRIC.search(m)})
