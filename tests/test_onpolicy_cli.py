"""`distill onpolicy` end to end through typer, and its refusals: exit code 2, one line, nothing
recorded in the run directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from cli import app
from distill.tasks import corpus
from students.tiny import TINY_SHAPES, save_pretrained, tiny_qwen3, train_tokenizer
from tests.conftest import TinyPair

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


SMALL = ["--steps", "2", "--prompts-per-step", "2", "--max-tokens", "8", "--n-prompts", "8"]


def invoke(run_dir: Path, teacher: Path, student: Path, *extra: str) -> tuple[int, str]:
    args = ["--run-dir", str(run_dir), "--teacher", str(teacher), "--student", str(student)]
    result = runner.invoke(app, ["onpolicy", *args, *SMALL, *extra])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def test_onpolicy_command_trains_and_reports(tiny_pair: TinyPair, tmp_path: Path) -> None:
    code, out = invoke(tmp_path, tiny_pair.teacher_dir, tiny_pair.student_dir,
                       "--divergence", "jsd", "--beta", "0.5")  # fmt: skip
    assert code == 0, out
    assert "final loss" in out and "top-k overlap" in out
    assert (tmp_path / "onpolicy" / "checkpoint" / "model.safetensors").exists()


def test_top_k_above_the_teacher_limit_exits_2(tiny_pair: TinyPair, tmp_path: Path) -> None:
    code, out = invoke(tmp_path, tiny_pair.teacher_dir, tiny_pair.student_dir, "--top-k", "999")
    assert code == 2, out
    assert "--top-k 999 is outside 1..512" in out
    assert not (tmp_path / "config.json").exists()


def test_a_student_with_another_vocabulary_exits_2(tiny_pair: TinyPair, tmp_path: Path) -> None:
    words = ["the quick brown fox jumps over the lazy dog", "zebra quartz vex jinx"] * 40
    other_tok = train_tokenizer(words + corpus(50, seed=9), vocab_size=450)
    assert other_tok.get_vocab() != tiny_pair.tokenizer.get_vocab()
    other = tmp_path / "other"
    save_pretrained(tiny_qwen3(TINY_SHAPES["tiny-student"], other_tok, seed=2), other_tok, other)
    code, out = invoke(tmp_path / "run", tiny_pair.teacher_dir, other)
    assert code == 2, out
    assert "tokenizers differ" in out and "ids differ" in out and "first:" in out


def test_a_student_with_another_chat_template_exits_2(tiny_pair: TinyPair, tmp_path: Path) -> None:
    student = tmp_path / "student"
    shutil.copytree(tiny_pair.student_dir, student)
    tok = AutoTokenizer.from_pretrained(student)
    template = tok.chat_template.replace("<|im_start|>assistant\n", "<|im_start|>assistant:\n")
    assert template != tok.chat_template
    tok.chat_template = template
    tok.save_pretrained(student)
    code, out = invoke(tmp_path / "run", tiny_pair.teacher_dir, student)
    assert code == 2, out
    assert "first difference at token" in out


def test_lmbda_without_teacher_data_exits_2(tiny_pair: TinyPair, tmp_path: Path) -> None:
    code, out = invoke(tmp_path, tiny_pair.teacher_dir, tiny_pair.student_dir, "--lmbda", "0.5")
    assert code == 2, out
    assert "distill generate" in out
