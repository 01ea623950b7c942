"""Two CPU processes under `accelerate launch` = one process, on the first step.

Two processes each take half of every batch; gradients are averaged by DDP (gloo) and the loss is
normalised by the step's global target tokens, so loss and gradient norm must match one process
holding the whole batch. About 30 s: two fresh interpreters import torch and transformers.

Why `--multi_gpu` and not `--cpu`: in accelerate 1.x, `accelerate launch --cpu --num_processes 2`
goes to its simple launcher, which starts ONE process unless `--mpirun_hostfile` is given (and
`mpirun`, absent here, is installed). `--multi_gpu --num_processes 2` starts two processes with
torch.distributed.run; on a machine without CUDA, `Accelerator(cpu=True)` then sets up gloo
(DistributedType.MULTI_CPU). The test asserts the run really had two processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_offpolicy_train import Recorder, config, write_data

from distill.accounting import GpuLedger
from distill.offpolicy import train as offpolicy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    flags: list[str], args: list[str], timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """`accelerate launch <flags> distill <args>` on one machine, one CPU thread per process."""
    distill = Path(sys.executable).parent / "distill"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        # A free port, not 29500: another job's process group there would hang the rendezvous.
        "--main_process_port", str(free_port()), str(distill), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own process group: a timeout kills every rank, not only the launcher.
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def test_two_cpu_processes_match_one_on_the_first_step(tmp_path, tiny_pair) -> None:
    write_data(tmp_path / "data", tiny_pair.tokenizer, 4)
    one, one_ledger = Recorder(), GpuLedger()
    cfg = config(tmp_path / "one", tiny_pair.student_dir, tmp_path / "data", steps=1)
    offpolicy.train(cfg, one_ledger, one)
    args = [
        "offpolicy", "--run-dir", str(tmp_path / "two"), "--student", str(tiny_pair.student_dir),
        "--data-dir", str(tmp_path / "data"), "--steps", "1", "--batch-size", "4",
        "--micro-batch-size", "2", "--lr", "0.01", "--warmup-steps", "1", "--log-every", "1",
    ]  # fmt: skip
    done = launch(["--multi_gpu", "--num_processes", "2"], args, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # only rank 0 writes
    two = json.loads(lines[0])
    assert two["processes"] == 2 and one.metrics[1]["processes"] == 1
    assert two["tokens"] == one.metrics[1]["tokens"]
    assert two["loss"] == pytest.approx(one.metrics[1]["loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one.metrics[1]["grad_norm"], rel=1e-4)
    assert (tmp_path / "two" / "offpolicy" / "checkpoint" / "model.safetensors").exists()
    # Each process trained on half the batch; the job's ledger counts both halves (rank 1's
    # through its shard), so it counts what one process holding the whole batch counted.
    job = GpuLedger.load(tmp_path / "two" / "ledger.json")
    assert (tmp_path / "two" / "ledger.rank1.json").exists()
    assert job.devices == 2
    assert job.phases["student.train"].tokens == one_ledger.phases["student.train"].tokens
    assert job.phases["student.train"].flops == one_ledger.phases["student.train"].flops


def test_shipped_accelerate_configs_parse() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    root = Path(__file__).parents[1] / "configs" / "accelerate"
    kinds = {
        "ddp.yaml": DistributedType.MULTI_GPU,
        "fsdp.yaml": DistributedType.FSDP,
        "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
    }
    for name, kind in kinds.items():
        config = load_config_from_file(str(root / name))
        assert config.distributed_type == kind and config.num_processes == 8
    assert load_config_from_file(str(root / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2
