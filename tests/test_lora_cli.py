"""`--lora-rank` through the real CLI: off-policy and on-policy end to end with merged checkpoints,
the settings recorded in config.json, and the refusals (exit 2, one line, nothing lost)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from cli import app
from tests.conftest import TinyPair
from tests.test_bad_inputs import refused
from tests.test_offpolicy_train import write_data

pytest.importorskip("peft")

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def off(run: Path, student: Path, *extra: str) -> list[str]:
    return ["offpolicy", "--run-dir", str(run), "--student", str(student), "--steps", "2",
            "--batch-size", "4", "--micro-batch-size", "2", *extra]  # fmt: skip


def on(run: Path, pair: TinyPair, *extra: str) -> list[str]:
    return ["onpolicy", "--run-dir", str(run), "--teacher", str(pair.teacher_dir),
            "--student", str(pair.student_dir), "--steps", "2", "--prompts-per-step", "2",
            "--max-tokens", "8", "--n-prompts", "8", *extra]  # fmt: skip


def check_merged(checkpoint: Path) -> None:
    """A plain from_pretrained folder, with the adapters kept beside it for resume."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    assert not any("lora" in name for name, _ in model.named_parameters())
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["lora"]["adapters"]


def test_offpolicy_lora_end_to_end_then_a_changed_rank_is_refused(
    tiny_pair: TinyPair, tmp_path: Path
) -> None:
    write_data(tmp_path / "teacher_data", tiny_pair.tokenizer, 4)
    args = off(tmp_path, tiny_pair.student_dir, "--lora-rank", "4", "--lora-alpha", "16")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "final loss" in result.output
    recorded = json.loads((tmp_path / "config.json").read_text())["offpolicy"]
    assert (recorded["lora_rank"], recorded["lora_alpha"]) == (4, 16)
    check_merged(tmp_path / "offpolicy" / "checkpoint")
    refused(off(tmp_path, tiny_pair.student_dir, "--lora-rank", "8", "--lora-alpha", "16"),
            tmp_path, "changed: lora_rank", "--force")  # fmt: skip


def test_onpolicy_lora_end_to_end(tiny_pair: TinyPair, tmp_path: Path) -> None:
    result = runner.invoke(app, on(tmp_path, tiny_pair, "--lora-rank", "4"))
    assert result.exit_code == 0, result.output
    assert "final loss" in result.output
    recorded = json.loads((tmp_path / "config.json").read_text())["onpolicy"]
    assert (recorded["lora_rank"], recorded["lora_alpha"]) == (4, None)
    check_merged(tmp_path / "onpolicy" / "checkpoint")


def test_bad_lora_options_exit_2_before_recording(
    tiny_pair: TinyPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "witness").write_text("earlier work")
    refused(off(tmp_path, tiny_pair.student_dir, "--lora-alpha", "8"), tmp_path,
            "--lora-alpha needs --lora-rank > 0")  # fmt: skip
    refused(on(tmp_path, tiny_pair, "--lora-rank", "-2"), tmp_path, "--lora-rank -2 must lie in")
    monkeypatch.setitem(sys.modules, "peft", None)  # as where peft is not installed
    for args in (off(tmp_path, tiny_pair.student_dir), on(tmp_path, tiny_pair)):
        refused([*args, "--lora-rank", "4"], tmp_path, "pip install 'distill[peft]'")
    assert not (tmp_path / "config.json").exists()
