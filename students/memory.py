"""The C allocator under PyTorch's CPU tensors: which one runs, and handing its free memory back.

glibc's malloc keeps what a training step frees. Past its mmap threshold (which glibc raises to
the size of the largest block freed, up to 32 MB) every tensor lands in the heap; a phase that
allocates growing blocks, as sampling does with a KV cache extended by one position per token,
or a checkpointed backward that recomputes each layer's activations, leaves the heap fragmented:
the freed blocks stay mapped and counted in the process's RSS, and the next tensors do not fit
in them. Measured (Qwen3-0.6B LoRA student, bf16, gradient checkpointing, 2 micro-batches of
8 x (300 + 256) tokens, one optimizer step; 1.7 GiB once loaded): glibc peaked at 7.77 GiB in
79 s; tcmalloc at 3.14 GiB in 61 s; glibc trimmed before every decoder layer at 3.42 GiB in 94 s
(jemalloc 3.08 GiB in 145 s, glibc with its mmap threshold fixed at 8 MiB 3.11 GiB in 141 s).

So the `distill` command runs on tcmalloc where the host has it (`preload_command`; vLLM's CPU
backend asks for the same), and a trainee on glibc is trimmed layer by layer (`trim_each_layer`).
`release_free_memory` hands free pages back between phases on either allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the `distill` command reads this module before torch is imported
    import torch

Allocator = Literal["tcmalloc", "jemalloc", "glibc", "other"]

# DISTILL_MALLOC: infrastructure, read by the `distill` command before anything else runs.
MALLOC_ENV = "DISTILL_MALLOC"
MALLOC_CHOICES = ("auto", "tcmalloc", "system")  # auto: tcmalloc on hosts without a GPU, if found
PRELOADED_ENV = "DISTILL_MALLOC_PRELOADED"  # set in the re-executed process: never exec twice
TCMALLOC_INSTALL = (
    "apt install libtcmalloc-minimal4 (Debian, Ubuntu) or dnf install gperftools-libs"
)
# gperftools' tcmalloc can log allocations above 1 GiB to stderr ("tcmalloc: large alloc ...";
# libtcmalloc_minimal 4.5 stayed silent here), which KV caches and weights make routinely.
QUIET_LARGE_ALLOC = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 62)}


def allocator() -> Allocator:
    """The malloc this process runs on, read from its memory map."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return "other"
    preloaded: tuple[Allocator, ...] = ("tcmalloc", "jemalloc")
    for name in preloaded:
        if f"lib{name}" in maps:
            return name
    return "glibc" if _malloc_trim() is not None else "other"


def find_tcmalloc() -> str | None:
    """A tcmalloc shared library: vLLM's bundled copy (its CPU wheels ship one in vllm/libs) or
    the system's; None if neither is there. Imports nothing."""
    spec = importlib.util.find_spec("vllm")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for pattern in ("libtcmalloc_minimal*.so*", "libtcmalloc.so*"):
            bundled = sorted(glob.glob(os.path.join(root, "libs", pattern)))
            if bundled:
                return bundled[0]
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)  # the soname; the dynamic loader finds the file
        if found:
            return found
    return None


def has_gpu() -> bool:
    """An NVIDIA or AMD GPU's device node, without importing torch or a driver."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")


def preload_command(
    env: Mapping[str, str], argv: list[str], executable: str
) -> tuple[list[str], dict[str, str]] | None:
    """(argv, environment) that rerun this command on tcmalloc, or None to run it as it is.

    `DISTILL_MALLOC`: `auto` (default) preloads tcmalloc on a Linux host with no GPU (where host
    memory is the limit), if found; `tcmalloc` anywhere on Linux, and a ValueError if it is not
    installed; `system` never. A process already on another allocator (LD_PRELOAD) is left alone.
    """
    choice = env.get(MALLOC_ENV) or "auto"
    if choice not in MALLOC_CHOICES:
        raise ValueError(
            f"{MALLOC_ENV}={choice} is unknown: use one of {', '.join(MALLOC_CHOICES)}"
        )
    preload = env.get("LD_PRELOAD", "")
    if (
        choice == "system"
        or not sys.platform.startswith("linux")
        or env.get(PRELOADED_ENV)
        or any(name in preload for name in ("tcmalloc", "jemalloc", "mimalloc"))
        or (choice == "auto" and has_gpu())
    ):
        return None
    library = find_tcmalloc()
    if library is None:
        if choice == "tcmalloc":
            raise ValueError(
                f"{MALLOC_ENV}=tcmalloc but no tcmalloc is installed: {TCMALLOC_INSTALL}"
            )
        return None
    new_env = {
        **QUIET_LARGE_ALLOC,
        **env,
        "LD_PRELOAD": f"{library}:{preload}" if preload else library,
        PRELOADED_ENV: library,
    }
    return [executable, *argv[1:]], new_env


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


@functools.cache
def _tcmalloc_release() -> Callable[[], None] | None:
    """tcmalloc's MallocExtension_ReleaseFreeMemory, where this process runs on tcmalloc."""
    if allocator() != "tcmalloc":
        return None
    release = getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)
    if release is None:
        return None
    release.argtypes, release.restype = [], None
    return release


def release_free_memory() -> bool:
    """Return the allocator's free pages to the system; False where that is not possible.

    Costs a walk over the heap (milliseconds), so call it between phases, not per tensor.
    """
    release = _tcmalloc_release()
    if release is not None:
        release()
        return True
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def trim_each_layer(model: torch.nn.Module) -> int:
    """On glibc, give the heap's free pages back before each decoder layer's forward (its
    recompute under gradient checkpointing included), so a training step's freed activations
    are not held while the next layer allocates; in training mode only. The number of layers
    hooked (0 on any other allocator, or on a model without decoder layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    trim = _malloc_trim()
    if allocator() != "glibc" or trim is None:
        return 0

    def before_layer(module: torch.nn.Module, args: object) -> None:
        if module.training:  # not in sampling's decode steps: one trim per layer per token
            trim(0)

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.register_forward_pre_hook(before_layer)
    return len(layers)
