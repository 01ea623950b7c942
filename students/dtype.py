"""One dtype rule for every model distill loads: the student, its sampler and each teacher backend.

Training adds one choice (`precision`): on CUDA, `auto` trains a bf16 (fp16) checkpoint in bf16
(fp16) *compute* on fp32 *master weights* (accelerate's autocast): AdamW's updates are often
below bf16's resolution (8 bits of mantissa: a weight of 1.0 cannot move by less than 2^-8), so
pure bf16 weights silently stop learning at small learning rates. `bf16-mixed` asks for that
anywhere (CPU autocast included); `bfloat16` asks for pure bf16 weights and is warned about.

`auto` means the checkpoint's own dtype (config.json `dtype`, older `torch_dtype`) where the
device computes in it, so a bf16 checkpoint trains and serves in bf16 and is saved in bf16: it is
never silently widened to fp32 (2x the memory and the checkpoint size). Where the device does not
support it (bf16 on a CUDA card without it, fp16 matmuls on a CPU), `auto` falls back to fp32;
a checkpoint without a recorded dtype is fp32 (transformers' own default).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from students.presets import StudentError

logger = logging.getLogger(__name__)

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
# a trainer's --dtype: a dtype, or bf16 compute on fp32 master weights
TrainDTypeName = Literal["auto", "float32", "bfloat16", "float16", "bf16-mixed"]
Autocast = Literal["no", "bf16", "fp16"]
DTYPE_NAMES: tuple[DTypeName, ...] = ("auto", "float32", "bfloat16", "float16")
Concrete = Literal["float32", "bfloat16", "float16"]
CONCRETE: tuple[Concrete, ...] = ("float32", "bfloat16", "float16")
TORCH: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
HELP = "auto (the checkpoint's own dtype where the device supports it), float32, bfloat16, float16"
TRAIN_HELP = (
    "auto (GPU: bf16 compute on fp32 master weights for a bf16 checkpoint; CPU: the checkpoint's "
    "own dtype), bf16-mixed, float32, bfloat16 (pure: no fp32 master weights), float16"
)


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


@dataclass(frozen=True)
class Precision:
    """How a student trains: the dtype of its weights (and AdamW state), and of its forward."""

    params: Concrete  # master weights; what a checkpoint is saved in
    autocast: Autocast  # accelerate's mixed_precision ("no": compute in `params`)

    @property
    def compute(self) -> Concrete:
        """The forward's dtype: what a sampler engine runs in, and what each sync sends it."""
        if self.autocast == "bf16":
            return "bfloat16"
        return "float16" if self.autocast == "fp16" else self.params


def precision(name: str, checkpoint: str | Path | None, *, cuda: bool | None = None) -> Precision:
    """The training precision for `--dtype name` on this machine (see the module docstring)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "bf16-mixed":
        return Precision("float32", "bf16")
    asked = check_name(name)
    low = resolve_name(asked, checkpoint, cuda=cuda)
    if asked == "auto" and cuda and low in ("bfloat16", "float16"):
        return Precision("float32", "bf16" if low == "bfloat16" else "fp16")
    if cuda and low in ("bfloat16", "float16"):
        logger.warning(
            "training in pure %s (no fp32 master weights): AdamW updates below its resolution "
            "are lost; --dtype auto (or bf16-mixed) computes in bf16 on fp32 weights",
            low,
        )
    return Precision(low, "no")
