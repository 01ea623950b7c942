"""Where each process's models and engines run, and what every in-process vLLM engine shares.

distill runs one process per training device (`accelerate launch`); everything a process loads
beside its student (the HF teacher, the student's sampler engine, the in-process vLLM teacher)
goes on that process's own device, never on `cuda:0` for all ranks.
"""

from __future__ import annotations

import os

import torch


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
