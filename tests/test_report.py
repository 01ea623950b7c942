"""`distill report show|compare`: Table 21-shaped comparison of runs and imported RL reports."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from distill.accounting import GpuLedger, PhaseTotals
from distill.errors import DistillError
from distill.report_schema import SCHEMA, export, from_run_dir, validate

runner = CliRunner()
WIDE = {"COLUMNS": "300"}


def make_run(
    root: Path,
    name: str,
    phases: dict[str, float],
    evals: dict[str, dict[str, float]],
    configs: Mapping[str, Mapping[str, object]],
    marks: dict[str, float] | None = None,
) -> Path:
    run = root / name
    run.mkdir()
    if phases:
        ledger = GpuLedger("cpu")
        ledger.phases = {p: PhaseTotals(seconds=h * 3600, device_seconds=h * 3600, tokens=10)
                         for p, h in phases.items()}  # fmt: skip
        ledger.marks = marks or {}
        ledger.save(run / "ledger.json")
    (run / "eval.json").write_text(json.dumps(evals))
    (run / "config.json").write_text(json.dumps(configs))
    return run


EVAL_CONFIG: dict[str, object] = {"prompts": 32, "max_tokens": 96, "seed": 1, "top_k": 16}


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path, Path]:
    distill_run = make_run(
        tmp_path, "distill",
        {"teacher.generate": 0.5, "teacher.score": 0.2, "student.sample": 0.1,
         "student.train": 0.2, "eval": 0.1},
        {"before": {"accuracy_think": 0.1, "heldout_kl": 2.0},
         "after_offpolicy": {"accuracy_think": 0.4, "heldout_kl": 1.0},
         "after_onpolicy": {"accuracy_think": 0.6, "pass@1_think": 0.55, "pass@4_think": 0.8,
                            "heldout_kl": 0.5}},
        {"generate": {}, "offpolicy": {}, "onpolicy": {}, "eval": EVAL_CONFIG},
        marks={"before": 0.0, "after_offpolicy": 0.7, "after_onpolicy": 1.1},
    )  # fmt: skip
    rl_run = make_run(
        tmp_path, "rl", {"student.sample": 6.0, "student.train": 3.5, "eval": 0.5},
        {"before": {"accuracy_think": 0.4}, "after_rl": {"accuracy_think": 0.5,
                                                          "pass@1_think": 0.45}},
        {"rl": {}, "eval": EVAL_CONFIG}, marks={"before": 0.0, "after_rl": 9.5},
    )  # fmt: skip
    imported = tmp_path / "verl_grpo.json"
    imported.write_text(json.dumps({
        "schema": SCHEMA, "method": "GRPO (verl)", "device": "cpu",
        "device_hours": {"student.sample": 12.0, "student.train": 8.0},
        "total_device_hours": 20.0,
        "eval": {"final": {"pass@1_think": 0.5, "pass@4_think": 0.7}},
        "eval_set": {"prompts": 32, "seed": 1},
        "curve": [{"device_hours": 10.0, "pass@1_think": 0.45},
                  {"device_hours": 20.0, "pass@1_think": 0.5}],
    }))  # fmt: skip
    return distill_run, rl_run, imported


def test_compare_renders_two_runs_and_an_imported_report(runs, tmp_path: Path) -> None:  # noqa: ANN001
    distill_run, rl_run, imported = runs
    png = tmp_path / "cmp.png"
    args = ["report", "compare", str(distill_run), str(rl_run), str(imported),
            "--baseline", str(rl_run), "--plot", str(png)]  # fmt: skip
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("off-policy + on-policy distillation", "RL (GRPO)", "GRPO (verl)",
                 "pass@1_think", "pass@4_think", "accuracy_think", "rl (baseline)",
                 "0.11x", "1x", "2x", "CPU device-hours"):  # fmt: skip
        assert text in out, text
    assert "different sets" not in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_compare_json_gives_ratios_and_the_import_schema(runs) -> None:  # noqa: ANN001
    distill_run, rl_run, imported = runs
    args = ["report", "compare", str(distill_run), str(rl_run), str(imported), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["baseline"] == "distill"
    by_name = {r["name"]: r for r in out["runs"]}
    assert by_name["rl"]["ratio"] == pytest.approx(10.0 / 1.1, rel=1e-3)
    assert by_name["verl_grpo"]["total_device_hours"] == 20.0
    assert by_name["distill"]["eval"]["after_onpolicy"]["pass@4_think"] == 0.8
    # the distillation curve places each evaluation stage at its device-hours mark
    curve = by_name["distill"]["curve"]
    assert [p["device_hours"] for p in curve][:3] == pytest.approx([0.0, 0.7, 1.1])
    # every exported run is itself a valid import
    for r in out["runs"]:
        schema_part = {k: v for k, v in r.items() if k not in ("name", "source", "ratio")}
        validate(schema_part, r["name"])


def test_different_eval_sets_warn_and_show_side_by_side(runs, tmp_path: Path) -> None:  # noqa: ANN001
    distill_run, _, _ = runs
    other = make_run(tmp_path, "other", {"student.train": 1.0},
                     {"after_rl": {"accuracy_think": 0.3}},
                     {"rl": {}, "eval": {**EVAL_CONFIG, "prompts": 64}})  # fmt: skip
    result = runner.invoke(app, ["report", "compare", str(distill_run), str(other)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "evaluated on different sets" in result.output and "prompts" in result.output
    assert '"prompts": 64' in result.output  # the eval-set column, side by side


def test_a_run_without_a_ledger_says_which_phases_are_missing(runs, tmp_path: Path) -> None:  # noqa: ANN001
    distill_run, _, _ = runs
    bare = make_run(tmp_path, "bare", {}, {"after_onpolicy": {"accuracy_think": 0.2}},
                    {"offpolicy": {}, "onpolicy": {}, "eval": EVAL_CONFIG})  # fmt: skip
    result = runner.invoke(app, ["report", "compare", str(distill_run), str(bare)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "no ledger.json" in result.output
    assert "student.train, student.sample, teacher.score, eval" in result.output
    assert "unknown" in result.output
    partial = make_run(tmp_path, "partial", {"student.train": 1.0}, {"x": {"accuracy_think": 0}},
                       {"onpolicy": {}})  # fmt: skip
    problems = from_run_dir(partial).problems
    assert problems == [f"{partial}: ledger.json has no student.sample, teacher.score phase: "
                        "its total leaves that work out"]  # fmt: skip
    shown = runner.invoke(app, ["report", "show", str(bare)], env=WIDE)
    assert shown.exit_code == 0 and "no ledger.json" in shown.output


def test_show_prints_phases_mfu_and_stages(runs) -> None:  # noqa: ANN001
    distill_run, _, _ = runs
    result = runner.invoke(app, ["report", "show", str(distill_run)], env=WIDE)
    assert result.exit_code == 0, result.output
    for text in ("teacher.generate", "MFU", "after on-policy", "heldout_kl", "total"):
        assert text in result.output


GOOD = {
    "schema": SCHEMA, "method": "m", "device": "H100",
    "device_hours": {"student.train": 1.0}, "eval": {"final": {"pass@1_think": 0.5}},
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gpu_hours": {}}, "unknown field 'gpu_hours': did you mean 'device_hours'?"),
        ({"device_hours": {"student.train": "1h"}}, "field 'device_hours.student.train' must be"),
        ({"device_hours": {"student.train": -1}}, "field 'device_hours.student.train' must be"),
        ({"eval": {"final": {"pass@1_think": None}}}, "field 'eval.final.pass@1_think' must be"),
        ({"eval": []}, "field 'eval' must be a JSON object"),
        ({"schema": "other/2"}, "field 'schema' must be"),
        ({"total_device_hours": 3.0}, "field 'total_device_hours' is 3"),
        ({"curve": [{"pass@1_think": 0.1}]}, "field 'curve[0].device_hours' is missing"),
        ({"method": ""}, "field 'method' must be a non-empty string"),
    ],
)
def test_import_names_the_wrong_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(DistillError) as e:
        validate({**GOOD, **change}, "r.json")
    assert message in str(e.value)
    missing = {k: v for k, v in GOOD.items() if k != "device"}
    with pytest.raises(DistillError, match="required field 'device' is missing"):
        validate(missing, "r.json")


def test_a_bad_import_exits_2_with_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**GOOD, "device_hours": {"student.train": "x"}}))
    result = runner.invoke(app, ["report", "compare", str(path)])
    assert result.exit_code == 2 and "device_hours.student.train" in result.output


def test_export_round_trips(runs) -> None:  # noqa: ANN001
    _, rl_run, _ = runs
    report = from_run_dir(rl_run)
    again = validate(json.loads(json.dumps(export(report))), "rl.json")
    assert again.device_hours == report.device_hours and again.evals == report.evals
