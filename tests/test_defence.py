"""The last line of defence (a bug ends in one line, a crash log, exit 1) and `--dry-run`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from cli.defence import phase_of
from distill.accounting import GpuLedger
from distill.offpolicy import train as offpolicy
from tests.conftest import TinyPair
from tests.test_reliability_kills import write_teacher_rows

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("engine core died\nunexpectedly")


@pytest.fixture
def run_dir(tiny_pair: TinyPair, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    write_teacher_rows(run / "teacher_data", tiny_pair.tokenizer, 8)
    (run / "witness.txt").write_text("earlier work")
    return run


def offpolicy_args(run: Path, pair: TinyPair, *extra: str) -> list[str]:
    return ["offpolicy", "--run-dir", str(run), "--student", str(pair.student_dir), "--steps",
            "1", "--batch-size", "4", "--micro-batch-size", "4", *extra]  # fmt: skip


def test_a_bug_ends_in_one_line_a_crash_log_and_exit_1(
    tiny_pair: TinyPair, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offpolicy, "train", boom)
    monkeypatch.delenv("DISTILL_DEBUG", raising=False)
    result = runner.invoke(app, offpolicy_args(run_dir, tiny_pair))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    line = errors[0]
    assert "internal error during offpolicy setup: RuntimeError: engine core died unexpectedly" in (
        line
    )
    logs = list(run_dir.glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in " ".join(result.output.split())
    text = logs[0].read_text()
    assert "Traceback" in text and "engine core died" in text and "def boom" not in text
    assert "in boom" in text  # the frame that raised
    assert (run_dir / "witness.txt").read_text() == "earlier work"


def test_distill_debug_prints_the_traceback(
    tiny_pair: TinyPair, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offpolicy, "train", boom)
    monkeypatch.setenv("DISTILL_DEBUG", "1")
    result = runner.invoke(app, offpolicy_args(run_dir, tiny_pair))
    assert result.exit_code == 1
    assert "Traceback" in result.output and "in boom" in result.output


def test_the_phase_is_the_ledger_phase_the_error_left() -> None:
    ledger = GpuLedger()
    try:
        with ledger.phase("teacher.score"):
            raise ValueError("dead engine")
    except ValueError as e:
        assert phase_of(e, "onpolicy") == "onpolicy (teacher.score)"
    assert phase_of(ValueError("x"), "eval") == "eval setup"


def test_dry_run_checks_everything_and_writes_nothing(tiny_pair: TinyPair, run_dir: Path) -> None:
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = runner.invoke(app, [*offpolicy_args(run_dir, tiny_pair), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and "8 kept teacher responses" in result.output
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # the same check that a real run would fail, refused by the dry run
    bad = runner.invoke(
        app, [*offpolicy_args(run_dir, tiny_pair), "--batch-size", "16", "--dry-run"]
    )
    assert bad.exit_code == 2 and "fewer than --batch-size 16" in bad.output
    fresh = run_dir.parent / "fresh"
    gen = ["generate", "--run-dir", str(fresh), "--teacher", str(tiny_pair.teacher_dir),
           "--n-prompts", "4", "--dry-run"]  # fmt: skip
    result = runner.invoke(app, gen)
    assert result.exit_code == 0, result.output
    assert "answers 4 prompts" in result.output
    assert not fresh.exists(), "a dry run created the run directory"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--lr", "-0.001"], "--lr -0.001 must be >= 0"),
        (["--lr", "nan"], "--lr nan is not finite"),
        (["--seed", "-1"], "--seed -1 must lie in [0, 2**63)"),
        (["--kd-divergence", "hellinger"], "--kd-divergence 'hellinger' is unknown: choose"),
        (["--steps", "99999999999999999999"], "--steps 99999999999999999999 must lie in"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(
    tiny_pair: TinyPair, tmp_path: Path, extra: list[str], needle: str
) -> None:
    run = tmp_path / "never"
    result = runner.invoke(app, offpolicy_args(run, tiny_pair, *extra))
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert needle in errors[0]
    assert not run.exists()
