"""Dtype end to end: `auto` is the checkpoint's own dtype, a bf16 student trains and is saved in
bf16 (LoRA merges in the input's dtype), and every teacher backend takes --teacher-dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli import app
from distill.accounting import GpuLedger
from distill.onpolicy import train as onpolicy
from distill.prompts import embedded_prompts
from students import dtype as dtypes
from students.placement import engine_dtype
from students.presets import StudentError
from students.tiny import save_pretrained
from teachers.hf import HFTeacher
from tests.conftest import TinyPair

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def bf16_pair(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny pair saved in bf16, as real Qwen3 checkpoints are."""
    root = tmp_path_factory.mktemp("bf16_pair")
    for name, model in (("teacher", tiny_pair.teacher), ("student", tiny_pair.student)):
        copy = type(model)(model.config)
        copy.load_state_dict(model.state_dict())
        save_pretrained(copy.to(torch.bfloat16), tiny_pair.tokenizer, root / name)
    return root / "teacher", root / "student"


def saved_dtypes(ckpt: Path) -> set[torch.dtype]:
    return {t.dtype for t in load_file(ckpt / "model.safetensors").values()}


def test_auto_is_the_checkpoints_own_dtype(tiny_pair: TinyPair, bf16_pair: tuple[Path, Path]):
    _, bf16 = bf16_pair
    assert dtypes.checkpoint_dtype(bf16) == "bfloat16"
    assert dtypes.resolve("auto", bf16, cuda=False) == torch.bfloat16  # CPUs compute in bf16
    assert dtypes.resolve("auto", tiny_pair.student_dir, cuda=False) == torch.float32
    assert dtypes.resolve("float32", bf16, cuda=False) == torch.float32  # asked: as asked
    assert dtypes.resolve("auto", None, cuda=False) == torch.float32
    # fp16 has no fast CPU matmuls: auto falls back to fp32 there, keeps fp16 on a GPU
    assert not dtypes.device_supports("float16", cuda=False)
    assert dtypes.device_supports("float16", cuda=True)
    assert engine_dtype(None, bf16, on_cpu=True) == "bfloat16"  # not vLLM's fp32 -> 16-bit "auto"
    assert engine_dtype(None, tiny_pair.teacher_dir, on_cpu=True) == "float32"
    with pytest.raises(StudentError, match="--teacher-dtype 'fp8' is not a dtype"):
        dtypes.check_name("fp8", "--teacher-dtype")


def test_hf_teacher_loads_in_its_own_dtype_or_the_asked_one(bf16_pair: tuple[Path, Path]) -> None:
    teacher_dir, _ = bf16_pair
    assert next(HFTeacher.from_pretrained(teacher_dir).model.parameters()).dtype == torch.bfloat16
    wide = HFTeacher.from_pretrained(teacher_dir, dtype="float32")
    assert next(wide.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize(("lora_rank", "dtype"), [(0, "auto"), (4, "auto"), (4, "float32")])
def test_bf16_student_checkpoints_stay_bf16(
    tmp_path: Path, bf16_pair: tuple[Path, Path], lora_rank: int, dtype: str
) -> None:
    """Full fine-tuning saves the training dtype; a LoRA merge saves the input's (bf16) dtype,
    even when the adapters were trained under --dtype float32: never silently widened."""
    if lora_rank:
        pytest.importorskip("peft")
    teacher_dir, student_dir = bf16_pair
    config = onpolicy.Config(
        run_dir=tmp_path,
        student=str(student_dir),
        steps=2,
        max_tokens=6,
        prompts_per_step=2,
        warmup_steps=1,
        lora_rank=lora_rank,
        dtype=dtype,
    )
    teacher = HFTeacher.from_pretrained(teacher_dir)
    summary = onpolicy.train(config, teacher, embedded_prompts(4, 0, "train"), GpuLedger())
    assert summary.final_loss == summary.final_loss  # finite: bf16 training ran
    assert saved_dtypes(summary.checkpoint) == {torch.bfloat16}
    saved = json.loads((summary.checkpoint / "config.json").read_text())
    assert (saved.get("dtype") or saved.get("torch_dtype")) == "bfloat16"


def test_onpolicy_cli_rejects_a_bad_teacher_dtype(tmp_path: Path, tiny_pair: TinyPair) -> None:
    args = ["onpolicy", "--run-dir", str(tmp_path), "--teacher", str(tiny_pair.teacher_dir)]
    args += ["--student", str(tiny_pair.student_dir), "--teacher-dtype", "fp8", "--steps", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "--teacher-dtype 'fp8'" in result.output


def test_training_precision_by_device(
    bf16_pair: tuple[Path, Path], tiny_pair: TinyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, bf16 = bf16_pair
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # a GPU with bf16
    P = dtypes.Precision
    # GPU: bf16 compute on fp32 master weights; CPU: the checkpoint's own dtype, as before
    assert dtypes.precision("auto", bf16, cuda=True) == P("float32", "bf16")
    assert dtypes.precision("auto", bf16, cuda=False) == P("bfloat16", "no")
    assert dtypes.precision("auto", tiny_pair.student_dir, cuda=True) == P("float32", "no")
    assert dtypes.precision("bf16-mixed", tiny_pair.student_dir, cuda=False) == P("float32", "bf16")
    assert dtypes.precision("float32", bf16, cuda=True) == P("float32", "no")
    assert P("float32", "bf16").compute == "bfloat16"  # what a sampler engine runs in
    assert P("bfloat16", "no").compute == "bfloat16"


def test_pure_bf16_on_a_gpu_is_warned_about(
    bf16_pair: tuple[Path, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dtypes.precision("bfloat16", bf16_pair[1], cuda=True) == dtypes.Precision(
        "bfloat16", "no"
    )
    assert "no fp32 master weights" in caplog.text


def test_bf16_mixed_trains_fp32_masters_and_saves_them(
    tmp_path: Path, bf16_pair: tuple[Path, Path]
) -> None:
    """--dtype bf16-mixed (what auto means on a GPU): the forward runs under bf16 autocast, the
    weights and AdamW state stay fp32, so the checkpoint is fp32 (the training dtype) and the
    loss matches the fp32 run's to bf16's precision."""
    teacher_dir, student_dir = bf16_pair
    teacher = HFTeacher.from_pretrained(teacher_dir)
    losses = {}
    for dtype in ("float32", "bf16-mixed"):
        config = onpolicy.Config(
            run_dir=tmp_path / dtype, student=str(student_dir), steps=1, max_tokens=6,
            prompts_per_step=2, warmup_steps=1, dtype=dtype,
        )  # fmt: skip
        summary = onpolicy.train(config, teacher, embedded_prompts(4, 0, "train"), GpuLedger())
        losses[dtype] = summary.final_loss
        assert saved_dtypes(summary.checkpoint) == {torch.float32}
    setup = json.loads((tmp_path / "bf16-mixed" / "manifest.json").read_text())["setup"]
    assert setup["onpolicy"]["mixed_precision"] == "bf16"
    assert setup["onpolicy"]["dtype"] == "float32"  # the master weights
    assert losses["bf16-mixed"] == pytest.approx(losses["float32"], rel=5e-2)
    assert losses["bf16-mixed"] != losses["float32"]  # the forward really ran in bf16
