"""The --engine-* and --teacher-max-model-len / --teacher-concurrency options reach the configs
and refuse bad values as one `error:` line (exit 2) before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.root import app
from tests.conftest import TinyPair


@pytest.mark.parametrize("command", ["onpolicy", "rl"])
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--engine-placement", "own"], "need --engine-devices"),
        (["--engine-devices", "4,x"], "--engine-devices '4,x' is not a list of GPU indices"),
        (["--engine-memory", "1.5"], "--engine-memory 1.5 is not a share of the GPU"),
        (["--engine-devices", "4"], "applies to --engine-placement own"),
    ],
)
def test_bad_engine_options_are_one_line(
    command: str, extra: list[str], message: str, tiny_pair: TinyPair, tmp_path: Path
) -> None:
    args = [command, "--run-dir", str(tmp_path / "run"), "--student", str(tiny_pair.student_dir),
            "--dry-run", *extra]  # fmt: skip
    if command == "onpolicy":
        args += ["--teacher", str(tiny_pair.teacher_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_engine_and_teacher_options_reach_the_run(tiny_pair: TinyPair, tmp_path: Path) -> None:
    args = ["onpolicy", "--run-dir", str(tmp_path / "run"), "--student", str(tiny_pair.student_dir),
            "--teacher", str(tiny_pair.teacher_dir), "--dry-run", "--engine-placement", "own",
            "--engine-devices", "2,3", "--engine-tensor-parallel", "2", "--no-engine-sleep",
            "--teacher-max-model-len", "512", "--teacher-concurrency", "3"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    shown = "".join(c for c in result.output if c not in " \n│")  # the resolved config's table
    assert "EnginePlacement(mode='own'" in shown
    assert "tensor_parallel_size=2,sleep=False,devices=(2,3)" in shown
    bad = CliRunner().invoke(app, [*args[:-1], "0"])
    assert bad.exit_code == 2 and "--teacher-concurrency" in bad.output
