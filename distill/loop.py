"""What the three training loops (off-policy, on-policy, RL) share, so each reads as its step.

- `load_trainee`: tokenizer, student (LoRA or full), optimizer, the checkpoint's state restored,
  `accelerator.prepare`, the loss path (fused or logits) and the FLOP counts.
- `optimizer_step`: clip, set the scheduled LR, step, zero the gradients.
- `global_target_tokens`: the step's normaliser (see below).
- `log_step` and `save_due`/`save`: the metrics line and the checkpoint barrier.

The loops own masking and normalisation: a step's loss is sum(per-token loss * mask) divided by
the target tokens of the *whole optimizer step*, across micro-batches and processes. Each
`.backward()` then adds the right share and the summed gradient equals one big batch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill import adapters, checkpoint, manifest
from distill.accounting import GpuLedger, matmul_params
from distill.batch import Batch
from distill.errors import DistillError
from distill.fused_loss import LossPath, choose_loss_path
from distill.rundir import append_metrics
from distill.sampling import resolve_sampler
from students import dtype as dtypes
from students import lora
from students.load import check_head
from students.memory import allocator, release_free_memory, trim_each_layer

LogFn = Callable[[str, int, int, Mapping[str, float]], None]  # (phase, step, total, metrics)


def no_log(phase: str, step: int, total: int, metrics: Mapping[str, float]) -> None:
    del phase, step, total, metrics


class Schedule(Protocol):
    """The Config fields every loop's optimizer step reads."""

    @property
    def lr(self) -> float: ...
    @property
    def steps(self) -> int: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def min_lr_ratio(self) -> float: ...
    @property
    def grad_clip(self) -> float: ...


@dataclass(frozen=True, kw_only=True)
class Trainee:
    """The student as a loop trains it."""

    model: torch.nn.Module  # prepared: DDP/FSDP-wrapped where the run is distributed
    optimizer: torch.optim.Optimizer
    tokenizer: PreTrainedTokenizerBase
    source: str  # where weights and tokenizer came from: the checkpoint resumed, or the student
    resume: Path | None  # the checkpoint resumed from
    state: dict[str, Any]  # that checkpoint's trainer state ({} for a fresh start)
    precision: dtypes.Precision  # the weights' dtype and the forward's (autocast)
    path: LossPath  # fused (from hidden states) or logits, and why
    head_weight: torch.Tensor  # (V, H): the lm_head weight the fused path multiplies by
    n_params: int  # matmul parameters: FLOPs (distill/accounting.py)
    n_trainable: int  # of which trained (LoRA: the adapters)
    vocab_size: int  # the tokenizer's ids: divergences never give mass to padded head rows
    allocator: str  # the C malloc under host tensors, and how its heap is trimmed
    pad_id: int

    def unwrapped(self, accelerator: Accelerator) -> PreTrainedModel:
        """The model without DDP's wrapper (a PeftModel when LoRA-wrapped: same interface)."""
        return cast(PreTrainedModel, accelerator.unwrap_model(self.model))


def make_accelerator(
    dtype: dtypes.TrainDTypeName, student: str, **kwargs: Any
) -> tuple[Accelerator, dtypes.Precision]:
    """The run's Accelerator, with autocast where the training precision asks for it (on CUDA,
    `--dtype auto` on a bf16 checkpoint: bf16 compute on fp32 master weights)."""
    precision = dtypes.precision(dtype, student)
    # `--dtype` decides autocast (an accelerate config's mixed_precision is overridden). The
    # state is a process-wide singleton: a phase run after another with other autocast (distill
    # run, tests) resets it; the process group (PartialState) is kept.
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision.autocast:
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=precision.autocast, **kwargs
    )
    return accelerator, precision


class SamplingStep(Protocol):
    """The Config fields that size a sampling loop's step."""

    @property
    def prompts_per_step(self) -> int: ...
    @property
    def samples_per_prompt(self) -> int: ...
    @property
    def micro_batch_size(self) -> int: ...
    @property
    def sampler(self) -> str: ...


def check_world(accelerator: Accelerator, step: SamplingStep, *, even: bool = False) -> int:
    """The process count, once a sampling loop's step fits it: prompts split evenly over the
    processes when `even` or when the student is sharded, a sharded student is sampled by its
    own engine (vLLM), and under DeepSpeed each process's sequences fit one micro-batch (its
    engine steps inside `backward`)."""
    world, kind = accelerator.num_processes, accelerator.distributed_type
    prompts_per_step, micro_batch_size = step.prompts_per_step, step.micro_batch_size
    samples_per_prompt = step.samples_per_prompt
    sharded = kind in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if prompts_per_step % world and (even or sharded):
        raise DistillError(
            f"--prompts-per-step {prompts_per_step} does not split evenly over {world} "
            "processes: use a multiple of the process count"
        )
    if sharded and resolve_sampler(step.sampler) == "hf":
        # each process's responses end at other lengths: its forwards, which gather the shards
        # collectively, would not line up across processes
        raise DistillError(
            f"--sampler hf cannot sample a student sharded by {kind.value}: use --sampler vllm "
            "(the default on GPUs), or DDP for a student that fits one device"
        )
    mine = -(-prompts_per_step // world) * samples_per_prompt
    if kind == DistributedType.DEEPSPEED and mine > micro_batch_size:
        raise DistillError(
            f"under DeepSpeed a step is one micro-batch per process, but each process samples "
            f"{mine} sequences and --micro-batch-size is {micro_batch_size}: pass "
            f"--micro-batch-size {mine}, or use FSDP for accumulation"
        )
    return world


def fused_adamw(params: list[torch.nn.Parameter]) -> bool:
    """torch's fused AdamW (one kernel over every tensor) where each parameter lives on a device
    that has it: on 2 CPU cores 0.19 s per step for 307M fp32 parameters against 0.85 s for the
    default per-tensor loop. The same update, equal to rounding (2.4e-7 apart after 5 steps at
    lr 1e-2), and the same on 1 or 2 threads."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)


def load_trainee(
    accelerator: Accelerator,
    *,
    student: str,
    out: Path,
    precision: dtypes.Precision,
    lora_config: lora.Config | None,
    lr: float,
    weight_decay: float = 0.0,
    fused_loss: bool,
    gradient_checkpointing: bool = False,
) -> Trainee:
    """Load `student` (or resume from the latest checkpoint in `out`) and prepare it to train.

    LoRA: the frozen base always comes from `student`; a checkpoint holds it merged, and the
    adapters are restored from the checkpoint's state.
    """
    resume = checkpoint.latest(out)
    source = str(resume) if resume else student
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = adapters.load(
        student,
        resume,
        dtypes.TORCH[precision.params],
        lora_config,
        gradient_checkpointing=gradient_checkpointing,
    )
    vocab_size = len(tokenizer)
    check_head(model, vocab_size, source)
    heap = allocator()
    if accelerator.device.type == "cpu" and trim_each_layer(model):  # glibc: students/memory.py
        heap = "glibc, trimmed before each layer"
    n_params = matmul_params(model)
    n_trainable = matmul_params(model, trainable_only=True)
    params = adapters.trainable(model)
    optimizer = torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused_adamw(params)
    )
    state: dict[str, Any] = {}
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if resume:
        state = checkpoint.load_state(resume)
        adapters.restore(model, state, resume)
        if not fsdp:
            optimizer.load_state_dict(state["optimizer"])
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if resume and fsdp:  # the saved full state, sharded onto this process's parameters
        set_optimizer_state_dict(
            prepared,
            getattr(optimizer, "optimizer", optimizer),  # accelerate's wrapper: the torch one
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    prepared.train()
    unwrapped = accelerator.unwrap_model(prepared)
    return Trainee(
        model=prepared,
        optimizer=optimizer,
        tokenizer=tokenizer,
        source=source,
        resume=resume,
        state=state,
        precision=precision,
        path=choose_loss_path(fused_loss, accelerator, unwrapped),
        head_weight=unwrapped.get_output_embeddings().weight,
        n_params=n_params,
        n_trainable=n_trainable,
        vocab_size=vocab_size,
        allocator=heap,
        pad_id=int(tokenizer.pad_token_id),
    )


def record_setup(
    accelerator: Accelerator,
    trainee: Trainee,
    run_dir: Path,
    phase: str,
    lora_rank: int,
    sampler: Mapping[str, str | int] | None = None,
) -> None:
    """How the phase was built, in RUN_DIR/manifest.json: what `report compare` compares."""
    if accelerator.is_main_process:
        built = manifest.setup(
            accelerator,
            dtype=trainee.head_weight.dtype,
            fused=trainee.path.fused,
            loss_reason=trainee.path.reason,
            lora_rank=lora_rank,
            allocator=trainee.allocator,
            sampler=sampler,
        )
        manifest.record_setup(run_dir, phase, built)


def global_target_tokens(micro_batches: Sequence[Batch], accelerator: Accelerator) -> float:
    """Target tokens of this optimizer step on all processes, divided by the process count.

    DDP averages gradients over processes, so dividing each process's summed loss by
    (global tokens / world size) makes the averaged gradient that of sum / global tokens.
    """
    local = torch.tensor(float(sum(mb.n_targets for mb in micro_batches)))
    total = accelerator.reduce(local.to(accelerator.device), reduction="sum")
    assert isinstance(total, torch.Tensor)
    return max(float(total.item()), 1.0) / accelerator.num_processes


def lr_at(step: int, *, lr: float, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_ratio * lr` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def sync_gradients(
    accelerator: Accelerator, trainee: Trainee, *, last: bool
) -> AbstractContextManager[object]:
    """Around one micro-batch's backward: only the step's last all-reduces the gradients (DDP);
    the others accumulate locally."""
    return nullcontext() if last else accelerator.no_sync(trainee.model)


def optimizer_step(
    accelerator: Accelerator, trainee: Trainee, step: int, schedule: Schedule
) -> tuple[float, float]:
    """Clip, set the step's LR, step, zero the gradients: (grad norm before clipping, LR)."""
    norm = accelerator.clip_grad_norm_(trainee.model.parameters(), schedule.grad_clip)
    s = schedule
    lr = lr_at(step, lr=s.lr, steps=s.steps, warmup=s.warmup_steps, min_ratio=s.min_lr_ratio)
    set_lr(trainee.optimizer, lr)
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    release_free_memory()  # the step's freed activations: not held while the next one samples
    return (float("nan") if norm is None else float(norm)), lr


def log_step(
    accelerator: Accelerator,
    ledger: GpuLedger,
    log: LogFn,
    run_dir: Path,
    phase: str,
    step: int,
    steps: int,
    metrics: Mapping[str, float],
) -> None:
    """Show the step's metrics and append them, with the device-hours so far, to metrics.jsonl."""
    log(phase, step + 1, steps, metrics)
    if accelerator.is_main_process:
        record = {"phase": phase, "step": step, **metrics}
        append_metrics(run_dir, {**record, "device_hours": ledger.total_device_hours()})


def due(step: int, every: int, steps: int) -> bool:
    """Every `every` steps and at the last step: when to log, save or evaluate."""
    return (step + 1) % every == 0 or step == steps - 1


def optimizer_state(accelerator: Accelerator, trainee: Trainee) -> dict[str, Any]:
    """The optimizer's whole state for a checkpoint. Under FSDP every process joins: each holds
    the moments of its shards only, gathered here into one full state (keyed by parameter name)
    that `load_trainee` shards again on resume, for any number of processes."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return trainee.optimizer.state_dict()
    return get_optimizer_state_dict(
        trainee.model,
        getattr(trainee.optimizer, "optimizer", trainee.optimizer),
        options=StateDictOptions(full_state_dict=True, cpu_offload=True),
    )


def save(
    accelerator: Accelerator,
    trainee: Trainee,
    ledger: GpuLedger,
    run_dir: Path,
    out: Path,
    student: str,
    state: Mapping[str, Any],
) -> None:
    """Write a checkpoint to `out`; every process joins (FSDP/ZeRO-3 gather the weights there).

    `state`: the loop's own resume state beside the optimizer's (step, data position, RNG).
    `student`: the model the run started from (LoRA merges are saved in its dtype). Each
    process's ledger is saved too; rank 0 merges them.
    """
    if not accelerator.is_main_process:  # before the barrier: rank 0 merges it after
        ledger.save(run_dir / "ledger.json", rank=accelerator.process_index)
    accelerator.wait_for_everyone()
    model = trainee.unwrapped(accelerator)
    # LoRA checkpoints are merged from the unwrapped model (sharded runs are refused for LoRA)
    weights = None if lora.is_wrapped(model) else accelerator.get_state_dict(trainee.model)
    optimizer = optimizer_state(accelerator, trainee)  # collective under FSDP
    if accelerator.is_main_process:
        full = {"optimizer": optimizer, **state, **adapters.state(model)}
        exported = adapters.export(model, student)
        checkpoint.save(out, exported, trainee.tokenizer, full, state_dict=weights)
        ledger.save(run_dir / "ledger.json")
    accelerator.wait_for_everyone()
