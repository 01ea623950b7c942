"""One dtype rule for every model distill loads: the student, its sampler and each teacher backend.

`auto` means the checkpoint's own dtype (config.json `dtype`, older `torch_dtype`) where the
device computes in it, so a bf16 checkpoint trains and serves in bf16 and is saved in bf16: it is
never silently widened to fp32 (2x the memory and the checkpoint size). Where the device does not
support it (bf16 on a CUDA card without it, fp16 matmuls on a CPU), `auto` falls back to fp32;
a checkpoint without a recorded dtype is fp32 (transformers' own default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from students.presets import StudentError

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[DTypeName, ...] = ("auto", "float32", "bfloat16", "float16")
Concrete = Literal["float32", "bfloat16", "float16"]
CONCRETE: tuple[Concrete, ...] = ("float32", "bfloat16", "float16")
TORCH: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
HELP = "auto (the checkpoint's own dtype where the device supports it), float32, bfloat16, float16"


def check_name(name: str, option: str = "--dtype") -> DTypeName:
    for known in DTYPE_NAMES:
        if name == known:
            return known
    raise StudentError(f"{option} {name!r} is not a dtype: use one of {', '.join(DTYPE_NAMES)}")


def checkpoint_dtype(path: str | Path) -> Concrete:
    """The dtype a checkpoint folder was saved in ('float32' when it records none)."""
    config = Path(path) / "config.json"
    if not config.exists():
        return "float32"
    data = json.loads(config.read_text())
    name = data.get("dtype") or data.get("torch_dtype") or "float32"
    for concrete in CONCRETE:
        if concrete == name:
            return concrete
    return "float32"


def device_supports(name: str, cuda: bool) -> bool:
    """Whether the device computes in `name`: CPUs do fp32 and bf16 (fp16 matmuls are emulated)."""
    if name == "bfloat16" and cuda:
        return torch.cuda.is_bf16_supported()
    if name == "float16":
        return cuda
    return True


def resolve_name(name: str, checkpoint: str | Path | None, *, cuda: bool | None = None) -> Concrete:
    """The concrete dtype name for `name` ('auto' read from `checkpoint`)."""
    asked = check_name(name)
    if asked != "auto":
        return asked
    cuda = torch.cuda.is_available() if cuda is None else cuda
    own = checkpoint_dtype(checkpoint) if checkpoint is not None else "float32"
    return own if device_supports(own, cuda) else "float32"


def resolve(name: str, checkpoint: str | Path | None, *, cuda: bool | None = None) -> torch.dtype:
    """The torch dtype to load `checkpoint` in for `--dtype name`."""
    return TORCH[resolve_name(name, checkpoint, cuda=cuda)]
