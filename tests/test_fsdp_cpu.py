"""FSDP2 on CPU (gloo) in two processes: the sharded path a GPU node takes, run where CI can.

The student's weights, gradients and AdamW state are sharded over two processes; the step's loss
must match one process holding the whole batch, the checkpoint must gather the full weights
(`accelerator.get_state_dict`), and a rerun must resume from it. About a minute: two fresh
interpreters, twice.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_offpolicy_accelerate import launch
from test_offpolicy_train import Recorder, config, write_data

from distill.accounting import GpuLedger
from distill.offpolicy import train as offpolicy


def launch_fsdp(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return launch(
        ["--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
         "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
         "--fsdp_transformer_layer_cls_to_wrap", "Qwen3DecoderLayer",
         "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_reshard_after_forward", "true"],
        args, timeout,
    )  # fmt: skip


def test_fsdp2_two_cpu_processes_match_one_and_save_full_weights(tmp_path, tiny_pair) -> None:
    write_data(tmp_path / "data", tiny_pair.tokenizer, 4)
    one = Recorder()
    cfg = config(tmp_path / "one", tiny_pair.student_dir, tmp_path / "data", steps=2)
    offpolicy.train(cfg, GpuLedger(), one)
    args = [
        "offpolicy", "--run-dir", str(tmp_path / "two"), "--student", str(tiny_pair.student_dir),
        "--data-dir", str(tmp_path / "data"), "--steps", "2", "--batch-size", "4",
        "--micro-batch-size", "2", "--lr", "0.01", "--warmup-steps", "1", "--log-every", "1",
    ]  # fmt: skip
    done = launch_fsdp(args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in lines] == [2, 2]
    assert [r["fused_loss"] for r in lines] == [1.0, 1.0]  # FSDP2 takes the fused loss too
    for mine, ref in zip(lines, (one.metrics[1], one.metrics[2]), strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    saved = load_file(tmp_path / "two" / "offpolicy" / "checkpoint" / "model.safetensors")
    ref = load_file(tmp_path / "one" / "offpolicy" / "checkpoint" / "model.safetensors")
    assert saved.keys() == ref.keys()
    for k in ref:  # full, gathered tensors, the same training
        assert saved[k].shape == ref[k].shape, k
        # a tenth of one Adam step at lr 0.01: a lost or misplaced gradient moves a weight by ~lr,
        # while summation order alone moves an element whose gradient is near Adam's eps by ~1e-4
        assert float((saved[k].float() - ref[k].float()).abs().max()) < 1e-3, k


def test_fsdp2_resume_continues_as_the_uninterrupted_run(tmp_path, tiny_pair) -> None:
    """Two steps in one FSDP run, or one step, a stop, and a rerun to two: the same second step
    (the optimizer state is gathered into the checkpoint and sharded again on resume)."""
    write_data(tmp_path / "data", tiny_pair.tokenizer, 4)

    def args(run: str, steps: int) -> list[str]:
        return [
            "offpolicy", "--run-dir", str(tmp_path / run), "--student",
            str(tiny_pair.student_dir), "--data-dir", str(tmp_path / "data"), "--steps",
            str(steps), "--batch-size", "4", "--micro-batch-size", "2", "--lr", "0.01",
            "--warmup-steps", "1", "--log-every", "1", "--save-every", "1",
        ]  # fmt: skip

    # the rerun asks for more steps: --force records the changed config, the checkpoint stays
    for run, steps, more in (("whole", 2, []), ("split", 1, []), ("split", 2, ["--force"])):
        done = launch_fsdp(args(run, steps) + more)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    def second(run: str) -> dict[str, float]:
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if r["step"] == 1)

    split = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in split] == [0, 1]  # resumed at step 1, not restarted
    assert second("split")["loss"] == pytest.approx(second("whole")["loss"], rel=1e-5)
    assert second("split")["grad_norm"] == pytest.approx(second("whole")["grad_norm"], rel=1e-4)
    state = torch.load(tmp_path / "split" / "offpolicy" / "checkpoint" / "trainer_state.pt")
    assert state["optimizer"]["state"], "the gathered AdamW moments are in the checkpoint"


def test_sampling_steps_fit_the_world() -> None:
    """The sampling loops' step-size rules (`loop.check_world`), for each distributed type."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from distill.errors import DistillError
    from distill.loop import check_world
    from distill.onpolicy import train as onpolicy

    def world(kind: DistributedType, n: int = 2) -> Any:
        return SimpleNamespace(num_processes=n, distributed_type=kind)

    def step(**kw: object) -> onpolicy.Config:
        base = dict(run_dir=Path("unused"), student="unused", prompts_per_step=4,
                    samples_per_prompt=2, micro_batch_size=4, sampler="vllm")  # fmt: skip
        return onpolicy.Config(**{**base, **kw})  # type: ignore[arg-type]

    assert check_world(world(DistributedType.MULTI_CPU), step(prompts_per_step=3)) == 2  # DDP
    with pytest.raises(DistillError, match="split evenly"):
        check_world(world(DistributedType.MULTI_CPU), step(prompts_per_step=3), even=True)
    with pytest.raises(DistillError, match="split evenly"):
        check_world(world(DistributedType.FSDP), step(prompts_per_step=3))
    with pytest.raises(DistillError, match="--sampler hf cannot sample a student sharded"):
        check_world(world(DistributedType.FSDP), step(sampler="hf"))
    assert check_world(world(DistributedType.DEEPSPEED), step()) == 2  # 2 prompts x 2 = 4 fit
    with pytest.raises(DistillError, match="pass --micro-batch-size 8"):
        check_world(world(DistributedType.DEEPSPEED), step(prompts_per_step=8))
