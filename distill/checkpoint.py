"""Checkpoints: a `from_pretrained`-loadable folder plus the state needed for exact resume.

`<phase>/checkpoint/` holds config.json + model.safetensors + tokenizer files (load it with
`AutoModelForCausalLM.from_pretrained`) and `trainer_state.pt` (optimizer, step, RNG states, data
position, anything the loop adds), read back with `weights_only=True`. A new checkpoint is written
into a temporary folder and swapped in by rename; a kill mid-swap leaves `checkpoint.old`, which
`latest` falls back to.
"""

from __future__ import annotations

import json
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
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
        remove(stale)  # a writer killed mid-save left it; it is never read
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE)
        old = directory.with_name(directory.name + ".old")
        if directory.exists() or directory.is_symlink():
            remove(old)
            directory.rename(old)
        tmp.rename(directory)
        remove(old)
    except BaseException:
        remove(tmp)
        raise


def remove(path: Path) -> None:
    """Delete `path` without ever following a symlink out of the run directory.

    A symlink (to a folder anywhere) is unlinked, not entered; inside a real folder rmtree
    unlinks links too. Missing paths are fine: cleanup runs again after a kill.
    """
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def latest(directory: Path) -> Path | None:
    """The complete checkpoint folder to resume from, if any; a damaged one raises."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / STATE).exists() and (candidate / "config.json").exists():
            check_weights(candidate)
            return candidate
    return None


def check_weights(directory: Path) -> None:
    """Refuse truncated or garbled safetensors files (reads only their headers).

    We write them whole and rename, so damage came from outside (a partial copy, a bad disk);
    loading one fails deep inside transformers, resuming from `.old` silently loses steps.
    """
    for path in sorted(directory.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem is not None:
            raise DistillError(
                f"checkpoint {directory} is damaged ({path.name}: {problem}); delete that folder "
                "to restart the phase, or restore it from a copy"
            )


def _safetensors_problem(path: Path) -> str | None:
    """None when the header parses and the file holds every tensor's bytes, else what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            return f"header of {n} bytes in a {size}-byte file"
        try:
            header = json.loads(f.read(n))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "unreadable header"
    if 8 + n + end > size:
        return f"truncated: {size} of {8 + n + end} bytes"
    return None


def load_state(directory: Path) -> dict[str, Any]:
    try:
        return torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise DistillError(
            f"checkpoint {directory} is damaged ({type(e).__name__}); delete that folder to "
            "restart the phase, or restore it from a copy"
        ) from None
