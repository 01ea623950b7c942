"""LoRA in the training loops: what a trainer loads, optimises, saves and restores.

With `--lora-rank 0` (the default) a trainer fine-tunes every weight, and this module only hands
back the model it loaded. With rank r > 0 the base student stays frozen and gains rank-r adapters
(students/lora.py); then:
  load     the base always comes from the run's original `--student`, never from a checkpoint:
           checkpoints hold merged weights, and adding the adapters to them again would count
           the update twice;
  optimise only the adapters (`trainable`): AdamW state is 2 x adapter size, not 2 x model size;
  save     the checkpoint folder is a plain `from_pretrained` model with the adapters merged in
           (`export`), so evaluation, vLLM and the next stage need no peft; the adapters and a
           probe of the base go into trainer_state.pt (`state`);
  resume   base from `--student` -> wrap -> saved adapters (`restore`); the optimizer and RNG are
           restored by the trainer as for full fine-tuning, so a resumed run is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.errors import DistillError
from students import dtype as dtypes
from students import lora


def settings(rank: int, alpha: int | None, seed: int, sharded: bool = False) -> lora.Config | None:
    """The LoRA config of a trainer's `lora_rank`/`lora_alpha` (None: full fine-tuning).

    Checks that peft is installed, so a CLI calls it before recording anything. `sharded`: the
    weights are split over processes (FSDP, ZeRO-3), where merging them is not implemented.
    """
    if rank < 0:
        raise DistillError(f"--lora-rank {rank}: use 0 (full fine-tuning) or a positive rank")
    if rank == 0:
        if alpha is not None:
            raise DistillError("--lora-alpha needs --lora-rank > 0 (rank 0 trains every weight)")
        return None
    if alpha is not None and alpha <= 0:
        raise DistillError(f"--lora-alpha {alpha}: use a positive number (default 2 x rank)")
    if sharded:
        raise DistillError(
            "--lora-rank runs single-process or under DDP, not FSDP/DeepSpeed: merging the "
            "adapters needs every weight whole on one process; use configs/accelerate/ddp.yaml"
        )
    lora.require_peft()
    return lora.Config(rank=rank, alpha=alpha, seed=seed)


def load(
    student: str,
    resume: Path | None,
    dtype: torch.dtype,
    config: lora.Config | None,
    *,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """The model to train: the checkpoint (else `student`) in full, or `student` wrapped.

    `gradient_checkpointing`: keep only each layer's input for the backward and recompute the
    rest (activation memory ~ layers x tokens x hidden instead of ~10x that). Non-reentrant, so
    it works with a frozen embedding under LoRA without forcing input gradients.
    """
    source = str(resume) if resume and config is None else student
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model if config is None else lora.wrap(model, config)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer steps: all of them, or only the adapters under LoRA."""
    return [p for p in model.parameters() if p.requires_grad]


def export(model: PreTrainedModel, student: str | None = None) -> PreTrainedModel:
    """What a checkpoint folder holds: the model itself (in its training dtype), or a plain model
    of the merged weights in the dtype of the `student` checkpoint the adapters were put on."""
    if not lora.is_wrapped(model):
        return model
    merged = lora.merged_model(model)
    if student is not None:
        # Merges keep the input's dtype: a bf16 base trained under --dtype float32 saves bf16.
        torch.nn.Module.to(merged, dtypes.TORCH[dtypes.checkpoint_dtype(student)])
    return merged


def state(model: PreTrainedModel) -> dict[str, Any]:
    """Trainer-state entries for an exact resume: the adapters and a probe of the frozen base."""
    if not lora.is_wrapped(model):
        return {}
    adapters = {k: v.detach().cpu().clone() for k, v in lora.adapter_state(model).items()}
    return {"lora": {"adapters": adapters, "base_probe": lora.base_probe(model)}}


def restore(model: PreTrainedModel, saved: dict[str, Any], resume: Path) -> None:
    """Put the adapters of checkpoint `resume` back; refuse a checkpoint of the other kind."""
    wrapped = lora.is_wrapped(model)
    if wrapped != ("lora" in saved):
        written, now = ("with", "without") if "lora" in saved else ("without", "with")
        raise DistillError(
            f"checkpoint {resume} was written {written} LoRA and this run is {now}: resume with "
            "the --lora-rank of the run that wrote it, or use a new --run-dir"
        )
    if not wrapped:
        return
    probe, old = lora.base_probe(model), saved["lora"]["base_probe"]
    if probe.keys() != old.keys() or any(not torch.equal(probe[k], old[k]) for k in probe):
        raise DistillError(
            f"the base student changed since checkpoint {resume} was written (its LoRA adapters "
            "sit on the original weights): restore that --student, or use a new --run-dir"
        )
    lora.load_adapter_state(model, saved["lora"]["adapters"])
