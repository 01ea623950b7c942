"""Engine placement (issue #24 item 1), what CPU can check: the `vllm.LLM` arguments each mode
asks for, the options' validation, the GPUs an `own` engine is started on, and the gathering of
a tensor-parallel engine's requests over a real (gloo) process group of two processes."""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn

from students.placement import (
    COLOCATED_MEMORY,
    CPU_BATCHED_TOKENS,
    CPU_MEMORY,
    MULTIPROCESSING_ENV,
    OWN_MEMORY,
    EnginePlacement,
    engine_environment,
    engine_kwargs,
    gather_requests,
    tensor_parallel_group,
)
from students.presets import StudentError

LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def restored_environment() -> Iterator[None]:
    """engine_kwargs sets the rendezvous of a lone process in os.environ: gone after each test,
    or a later test's Accelerator would see WORLD_SIZE and look for a process group."""
    with mock.patch.dict(os.environ):
        yield


def test_cpu_engines_keep_the_vllm_cpu_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*LAUNCH_ENV, MULTIPROCESSING_ENV):
        monkeypatch.delenv(name, raising=False)
    cpu = {"enforce_eager": True, "gpu_memory_utilization": CPU_MEMORY, "seed": 3,
           "max_num_batched_tokens": CPU_BATCHED_TOKENS}  # fmt: skip
    # A lone process runs its engine inline, and only while the engine starts does vLLM see 0.
    inline = cpu | {"distributed_executor_backend": "uni"}
    assert engine_kwargs(EnginePlacement(), on_cpu=True, seed=3) == inline
    set_num_threads = torch.set_num_threads
    with engine_environment(EnginePlacement(), on_cpu=True):
        assert os.environ[MULTIPROCESSING_ENV] == "0"
        torch.set_num_threads = lambda n: None  # what vLLM's CPU worker does to the process
    assert MULTIPROCESSING_ENV not in os.environ and torch.set_num_threads is set_num_threads
    # vLLM's own processes where the user asks for them, and for every rank of a launched job.
    monkeypatch.setenv(MULTIPROCESSING_ENV, "1")
    assert engine_kwargs(EnginePlacement(), on_cpu=True, seed=3) == cpu
    monkeypatch.delenv(MULTIPROCESSING_ENV)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert engine_kwargs(EnginePlacement(), on_cpu=True, seed=3) == cpu
    with engine_environment(EnginePlacement(), on_cpu=True):
        assert MULTIPROCESSING_ENV not in os.environ


def test_colocated_engine_runs_in_the_ranks_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    kwargs = engine_kwargs(EnginePlacement(), on_cpu=False, seed=3)
    assert kwargs["distributed_executor_backend"] == "external_launcher"  # not cuda:0 for all
    assert kwargs["gpu_memory_utilization"] == COLOCATED_MEMORY
    assert (kwargs["enable_sleep_mode"], kwargs["tensor_parallel_size"]) == (True, 1)
    # A lone process: the rendezvous external_launcher reads is set for it.
    assert os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0
    # Under a launcher: rank 5 of 8 with TP 2 is in engine 2; TP 2 ranks share the seed.
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    tp2 = engine_kwargs(EnginePlacement(tensor_parallel_size=2), on_cpu=False, seed=3)
    assert tp2["seed"] == 3 + 2 and tp2["tensor_parallel_size"] == 2
    with pytest.raises(StudentError, match="does not divide the 8 training processes"):
        engine_kwargs(EnginePlacement(tensor_parallel_size=3), on_cpu=False, seed=0)


def test_own_engines_take_their_gpus_and_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    own = EnginePlacement(mode="own", devices=(4, 5, 6, 7), tensor_parallel_size=2)
    kwargs = engine_kwargs(own, on_cpu=False, seed=0)
    assert kwargs["weight_transfer_config"] == {"backend": "nccl"}
    assert kwargs["gpu_memory_utilization"] == OWN_MEMORY
    with engine_environment(own, on_cpu=False):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"  # rank 1's two
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"  # restored
    few = EnginePlacement(mode="own", devices=(4, 5), tensor_parallel_size=2)
    with (
        pytest.raises(StudentError, match="lists 2 GPUs for 2 processes of 2 GPUs each"),
        engine_environment(few, on_cpu=False),
    ):
        pass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpu_memory_utilization": 1.5}, "--engine-memory 1.5 is not a share"),
        ({"gpu_memory_utilization": 0.0}, "--engine-memory 0.0 is not a share"),
        ({"tensor_parallel_size": 0}, "--engine-tensor-parallel 0"),
        ({"mode": "own"}, "need --engine-devices"),
        ({"devices": (1,)}, "applies to --engine-placement own"),
        ({"mode": "far"}, "engine placement 'far' is unknown"),
    ],
)
def test_bad_placements_name_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(StudentError, match=message):
        EnginePlacement(**kwargs)


def _gather_worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group = tensor_parallel_group(EnginePlacement(tensor_parallel_size=2), on_cpu=False)
    mine = [f"r{rank}p{i}" for i in range(rank + 1)]  # rank 0: one request, rank 1: two
    everyone, own = gather_requests(mine, group)
    out[rank] = (everyone, everyone[own])
    dist.destroy_process_group()


def test_tensor_parallel_ranks_submit_the_same_requests() -> None:
    assert gather_requests(["a", "b"], None) == (["a", "b"], slice(0, 2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with multiprocessing.Manager() as manager:
        out = manager.dict()
        spawn(_gather_worker, args=(port, out), nprocs=2, join=True)
        result = dict(out)
    both = ["r0p0", "r1p0", "r1p1"]
    assert result[0] == (both, ["r0p0"]) and result[1] == (both, ["r1p0", "r1p1"])
