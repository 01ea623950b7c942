"""`distill eval` and `distill students` through CliRunner, with their bad-input contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TinyPair
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def evaluated(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    args = [
        "eval", "--run-dir", str(run_dir), "--model", str(tiny_pair.student_dir),
        "--n-prompts", "2", "--modes", "think", "--n", "2", "--k", "1,2", "--max-tokens", "6",
        "--thinking-budget", "3", "--plot", str(run_dir / "curve.png"), "--name", "tiny",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "pass@k by mode: tiny" in result.output and "Thinking budget" in result.output
    again = runner.invoke(app, args)  # same settings: read back, not sampled again
    assert again.exit_code == 0 and "is up to date" in again.output, again.output
    return run_dir


def test_eval_writes_result_plot_and_ledger(evaluated: Path) -> None:
    result = json.loads((evaluated / "eval" / "tiny.json").read_text())
    assert set(result["modes"]) == {"think"}
    assert set(result["modes"]["think"]) >= {"pass@1", "pass@2", "correct_counts"}
    assert [r["budget"] for r in result["budget_curve"]] == [3]
    assert result["config"]["n"] == 2 and result["sampler"] == "hf"
    assert (evaluated / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "eval" in json.loads((evaluated / "ledger.json").read_text())["phases"]


def test_report_shows_eval_results(evaluated: Path) -> None:
    result = runner.invoke(app, ["report", "show", str(evaluated)])
    assert result.exit_code == 0, result.output
    assert "pass@k by mode: tiny" in result.output
    assert "no eval.json" not in result.output  # its results are this run's evaluations


def test_eval_without_answers_exits_2(tiny_pair: TinyPair, tmp_path: Path) -> None:
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"prompt": "What is 2 + 2?"}\n')
    args = ["eval", "--run-dir", str(tmp_path / "r"), "--model", str(tiny_pair.student_dir)]
    result = runner.invoke(app, [*args, "--prompts", str(bare)])
    assert result.exit_code == 2
    assert "no answers in column 'answer'" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "9B"], "unknown student '9B'"),
        (["--n", "8", "--k", "1,16"], "out of range"),
        (["--k", "one"], "comma-separated integers"),
        (["--stage", "after_onpolicy"], "no onpolicy checkpoint"),
    ],
)
def test_eval_bad_input_exits_2(tmp_path: Path, extra: list[str], message: str) -> None:
    result = runner.invoke(app, ["eval", "--run-dir", str(tmp_path), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_students_table_and_architecture_check(tiny_pair: TinyPair) -> None:
    # The whole table, whatever the terminal. (Setting console.width would pin the shared
    # console's width for every later test, even after monkeypatch "restores" it.)
    table = runner.invoke(app, ["students"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "30B-A3B" in table.output and "│ 8B      │     36 │" in table.output
    assert "8.19B" in table.output and "3.35B" in table.output  # total; MoE active
    wrong = runner.invoke(app, ["students", "--model", str(tiny_pair.student_dir), "--size", "8B"])
    assert wrong.exit_code == 2 and "is not a Qwen3-8B" in wrong.output
    unknown = runner.invoke(app, ["students", "--model", str(tiny_pair.student_dir)])
    assert unknown.exit_code == 0 and "not one of the Qwen3 sizes" in unknown.output
