"""The spine end to end through the CLI (typer's CliRunner), plus its bad-input contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from cli import app
from distill.tasks import problems

runner = CliRunner()

# 32 held-out prompts x 2 modes: with 8, the sampled reverse KL's noise was as large as 12 on-policy
# steps' effect (it rose 0.308 -> 0.325 on one CPU, fell on another)
SHORT = [
    "--n-prompts", "48", "--eval-prompts", "32", "--max-tokens", "64",
    "--offpolicy-steps", "25", "--onpolicy-steps", "12", "--top-k", "8",
]  # fmt: skip


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 task prompts (48 to train on, 32 held out) *without* an answer column: the barely
    trained test teacher is rarely right, so its responses are filtered for being finished, not
    for being correct."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in problems(96, 0)))
    return path


@pytest.fixture(scope="module")
def finished_run(
    trained_pair: tuple[Path, Path], prompt_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    teacher, student = trained_pair
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    args = ["run", "--run-dir", str(run_dir), "--teacher", str(teacher), "--student", str(student)]
    result = runner.invoke(app, [*args, "--prompts", str(prompt_file), *SHORT])
    assert result.exit_code == 0, result.output
    return run_dir


def test_run_writes_the_run_directory(finished_run: Path) -> None:
    for name in ("config.json", "manifest.json", "ledger.json", "metrics.jsonl", "eval.json"):
        assert (finished_run / name).is_file(), name
    configs = json.loads((finished_run / "config.json").read_text())
    assert set(configs) >= {"generate", "offpolicy", "onpolicy", "eval"}
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert manifest["versions"]["torch"] and manifest["prompts"]["count"] == 48
    assert list((finished_run / "teacher_data").glob("shard-*.parquet"))


def test_ledger_has_the_four_phases(finished_run: Path) -> None:
    ledger = json.loads((finished_run / "ledger.json").read_text())
    for phase in ("teacher.generate", "teacher.score", "student.sample", "student.train"):
        assert ledger["phases"][phase]["device_seconds"] > 0, phase
        assert ledger["phases"][phase]["tokens"] > 0, phase
    assert ledger["unit"] == "CPU device-hours"


def test_each_divergence_falls_in_the_phase_that_optimises_it(finished_run: Path) -> None:
    evals = json.loads((finished_run / "eval.json").read_text())
    before, off, on = evals["before"], evals["after_offpolicy"], evals["after_onpolicy"]
    # Off-policy fits the teacher's responses: KL(teacher‖student) on held-out ones falls.
    assert off["heldout_kl"] < 0.8 * before["heldout_kl"]
    # On-policy minimises reverse KL on the student's own samples.
    assert on["onpolicy_rkl"] < off["onpolicy_rkl"]


def test_checkpoints_reload_with_from_pretrained(finished_run: Path) -> None:
    for stage in ("offpolicy", "onpolicy"):
        model = AutoModelForCausalLM.from_pretrained(finished_run / stage / "checkpoint")
        assert model.config.model_type == "qwen3"


def test_report_show_renders_the_ledger(finished_run: Path) -> None:
    result = runner.invoke(app, ["report", "show", str(finished_run)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "student.train" in result.output and "CPU device-hours" in result.output


def test_rerun_resumes_without_regenerating(
    finished_run: Path, trained_pair: tuple[Path, Path], prompt_file: Path
) -> None:
    teacher, student = trained_pair
    shards = {p: p.stat().st_mtime_ns for p in (finished_run / "teacher_data").glob("*.parquet")}
    args = [
        "run",
        "--run-dir",
        str(finished_run),
        "--teacher",
        str(teacher),
        "--student",
        str(student),
    ]
    result = runner.invoke(app, [*args, "--prompts", str(prompt_file), *SHORT])
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in shards} == shards


def _error_line(result: object) -> str:
    output = getattr(result, "stderr", "") or getattr(result, "output", "")
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:"), output
    assert "Traceback" not in output
    return " ".join(lines)


def test_missing_model_path_is_one_line_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["run", "--run-dir", str(tmp_path / "r"), "--teacher", "embedded",
              "--student", str(tmp_path / "nope")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "nope" in _error_line(result)


def test_empty_prompt_set_is_one_line_exit_2(
    tmp_path: Path, trained_pair: tuple[Path, Path]
) -> None:
    teacher, _ = trained_pair
    prompts = tmp_path / "empty.jsonl"
    prompts.write_text('{"prompt": ""}\n{"prompt": "   "}\n')
    result = runner.invoke(
        app, ["generate", "--run-dir", str(tmp_path / "r"), "--teacher", str(teacher),
              "--prompts", str(prompts)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "no non-empty prompts" in _error_line(result)


def test_unknown_student_preset_is_one_line_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["offpolicy", "--run-dir", str(tmp_path), "--student", "13B"])
    assert result.exit_code == 2
    assert "13B" in _error_line(result)


def test_unwritable_run_dir_under_a_file_is_one_line_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = runner.invoke(app, ["offpolicy", "--run-dir", str(blocker / "run"), "--student", "x"])
    assert result.exit_code == 2
    assert "--run-dir" in _error_line(result)
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("rank, prints", [("0", True), ("1", False)])
def test_only_rank_0_prints_under_a_launcher(rank: str, prints: bool) -> None:
    # accelerate launch (torchrun) sets RANK in every process; a fresh interpreter reads it.
    distill = Path(sys.executable).parent / "distill"
    env = {**os.environ, "RANK": rank, "COLUMNS": "200"}
    out = subprocess.run(
        [str(distill), "students"], capture_output=True, text=True, env=env, check=True
    )
    assert ("0.6B" in out.stdout) == prints


def test_a_table_printed_to_a_pipe_keeps_every_cell() -> None:
    # rich would wrap a non-terminal at 80 columns and cut the plan's cells to "...".
    distill = Path(sys.executable).parent / "distill"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [str(distill), "plan", "--student", "8B", "--teacher", "235B-A22B"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    assert "…" not in out
    row = next(line for line in out.splitlines() if "student.sample" in line and "RL" in line)
    assert "Qwen3-8B" in row and "memory" in row


def test_run_records_the_loss_path_of_both_stages(
    finished_run: Path, trained_pair: tuple[Path, Path], prompt_file: Path, tmp_path: Path
) -> None:
    def paths(run_dir: Path) -> tuple[bool, bool, set[float]]:
        recorded = json.loads((run_dir / "config.json").read_text())
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        used = {row["fused_loss"] for row in map(json.loads, lines) if "fused_loss" in row}
        return recorded["offpolicy"]["fused_loss"], recorded["onpolicy"]["fused_loss"], used

    assert paths(finished_run) == (True, True, {1.0})  # the default: fused, and it ran fused
    teacher, student = trained_pair
    short = ["--n-prompts", "16", "--eval-prompts", "4", "--max-tokens", "64",
             "--offpolicy-steps", "2", "--offpolicy-batch-size", "8", "--onpolicy-steps", "1",
             "--top-k", "8"]  # fmt: skip
    args = ["run", "--run-dir", str(tmp_path), "--teacher", str(teacher), "--student", str(student)]
    result = runner.invoke(app, [*args, "--prompts", str(prompt_file), *short, "--no-fused-loss"])
    assert result.exit_code == 0, result.output
    assert paths(tmp_path) == (False, False, {0.0})
