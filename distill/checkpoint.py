"""Checkpoints: a `from_pretrained`-loadable folder plus the state needed for exact resume.

`<phase>/checkpoint/` holds config.json + model.safetensors + tokenizer files (load it with
`AutoModelForCausalLM.from_pretrained`) and `trainer_state.pt` (optimizer, step, RNG states, data
position, anything the loop adds), read back with `weights_only=True`. A new checkpoint is written
into a temporary folder and swapped in by rename; a kill mid-swap leaves `checkpoint.old`, which
`latest` falls back to.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import DistillError

STATE = "trainer_state.pt"


def save(
    directory: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    state: dict[str, Any],
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write model, tokenizer and trainer state to `directory`, atomically replacing it.

    `state_dict`: the full weights when `model` holds only a shard of them (FSDP, ZeRO-3: pass
    `accelerator.get_state_dict(model)`, gathered on every process).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE)
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def latest(directory: Path) -> Path | None:
    """The complete checkpoint folder to resume from, if any."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / STATE).exists() and (candidate / "config.json").exists():
            return candidate
    return None


def load_state(directory: Path) -> dict[str, Any]:
    try:
        return torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise DistillError(
            f"checkpoint {directory} is damaged ({type(e).__name__}); delete that folder to "
            "restart the phase, or restore it from a copy"
        ) from None
