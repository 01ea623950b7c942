"""Off-policy distillation: fine-tune the student on the teacher's kept responses.

    distill offpolicy --run-dir runs/demo --student PATH
    accelerate launch --config_file configs/accelerate/ddp.yaml "$(which distill)" offpolicy \\
        --run-dir runs/demo --student PATH

Loss: cross-entropy on response tokens only (the thinking included in thinking mode), plus, when
the data stores the teacher's top-k, `kd_weight` x a divergence to it (logit-level KD, through
`losses/`). Prompt tokens are context. Forced tokens (the budget's stop sentence) are context too,
never targets: they were not sampled from the teacher, and a student trained on them learns to
give up thinking by itself; the budget is the caller's to enforce at inference, as it was here.
In non-thinking mode the template puts the empty think block into the *prompt* (hard switch), so
by default it is context as well; `think_block="target"` moves it into the response (the student
then learns to write it) and marks the user turn with `/no_think`, so the target is conditioned on
a switch the student can see: Qwen3's soft-switch format. Data generated with `--soft-switch`
has the block in the response already.

A step's loss is the sum over its target tokens divided by the target tokens of the whole
optimizer step, across micro-batches and processes (`objective.global_target_tokens`), so
accumulation and data parallelism give the gradient of one big batch.

Exact resume: the checkpoint holds the weights, the optimizer, the step (the schedule is a pure
function of it), every process's torch RNG state and the data position (epoch and batch, checked
against a fingerprint of the data). The batch order is rebuilt from (seed, epoch), so a resumed
run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedType, gather_object
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distill import adapters, checkpoint, manifest
from distill.accounting import GpuLedger, matmul_params, train_flops
from distill.batch import Batch, Example, collate, next_token_view, step_batches
from distill.errors import DistillError
from distill.fused_step import ce_topk_loss, choose_head
from distill.objective import (
    Dtype,
    LogFn,
    cross_entropy,
    global_target_tokens,
    lr_at,
    no_log,
    resolve_dtype,
    set_lr,
    topk_divergence,
)
from distill.offpolicy.examples import fingerprint, load_examples
from distill.rundir import append_metrics, config_dict
from distill.validation import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, check_fields
from losses import Divergence
from students import lora

ThinkBlock = Literal["prompt", "target"]
Tracker = Literal["none", "all", "tensorboard", "wandb"]
TRACKERS: tuple[Tracker, ...] = ("none", "all", "tensorboard", "wandb")


@dataclass(frozen=True, kw_only=True)
class Config:
    run_dir: Path
    student: str  # a from_pretrained folder (or hub id where the network allows)
    data_dir: Path | None = None  # default: RUN_DIR/teacher_data
    output: str = "offpolicy"  # sub-folder of run_dir for checkpoints
    steps: Annotated[int, AT_LEAST_1] = 100
    batch_size: Annotated[int, AT_LEAST_1] = 16  # sequences per optimizer step (all processes)
    micro_batch_size: Annotated[int, AT_LEAST_1] = 8  # per forward/backward on one process
    lr: Annotated[float, NON_NEGATIVE] = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: Annotated[float, FRACTION] = 0.1
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0
    grad_clip: Annotated[float, POSITIVE] = 1.0
    kd_weight: Annotated[float, NON_NEGATIVE] = 0.0  # > 0 needs data generated with --store-topk
    kd_divergence: Divergence = "forward_kl"
    # no_think rows: the empty think block as "prompt" or "target"
    think_block: ThinkBlock = "prompt"
    dtype: Dtype = "auto"  # the student checkpoint's own where supported (students/dtype.py)
    gradient_checkpointing: bool = False  # recompute layer activations in the backward
    log_every: Annotated[int, AT_LEAST_1] = 10
    save_every: Annotated[int, AT_LEAST_1] = 50
    report_to: Tracker = "none"  # accelerate trackers
    seed: int = 0
    lora_rank: int = 0  # > 0: rank-r LoRA adapters on a frozen base (distill/adapters.py)
    lora_alpha: Annotated[int, AT_LEAST_1] | None = None  # scale = alpha / rank; None: 2 x rank
    fused_loss: bool = True  # CE (+ KD) from hidden states in chunks, no (B, T, V) logits

    def __post_init__(self) -> None:
        check_fields(self)  # ranges and choices, from the field types above
        if self.batch_size % self.micro_batch_size != 0:
            raise DistillError(
                f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size "
                f"{self.micro_batch_size}: every process runs the same number of micro-batches"
            )


@dataclass(frozen=True, kw_only=True)
class Summary:
    steps: int
    final_loss: float
    checkpoint: Path
    examples: int


def check_head(model: PreTrainedModel, vocab_size: int, source: str) -> None:
    """A head narrower than the tokenizer cannot score every id: another tokenizer's model."""
    head = model.get_output_embeddings()
    rows = int(head.weight.shape[0]) if isinstance(head, torch.nn.Linear) else vocab_size
    if rows < vocab_size:
        raise DistillError(
            f"model {source} has {rows} output rows but its tokenizer {vocab_size} ids: the "
            "weights and tokenizer belong to different models; use a folder whose config "
            "vocab_size covers its tokenizer"
        )


def micro_batch_loss(
    student: torch.nn.Module, mb: Batch, config: Config, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed per-token loss, summed cross-entropy) of one micro-batch; the caller normalises."""
    logits = student(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits  # (B, T, V)
    shifted, targets, mask, _, _ = next_token_view(logits, mb)
    ce = cross_entropy(shifted, targets, vocab_size) * mask  # (B, T-1): response targets only
    per_token = ce
    if config.kd_weight > 0:
        kd, _ = topk_divergence(logits, mb, config.kd_divergence, vocab_size)  # (B, T-1), masked
        per_token = ce + config.kd_weight * kd
    return per_token.sum(), ce.detach().sum()


def trackers(config: Config) -> list[str]:
    """The accelerate trackers `report_to` names, refusing ones that are not installed."""
    available = {str(t) for t in get_available_trackers()}
    wanted = {"none": [], "all": sorted(available)}.get(config.report_to, [config.report_to])
    missing = [t for t in wanted if t not in available]
    if missing:
        raise DistillError(
            f"--report-to {config.report_to}: {missing[0]} is not installed: "
            f"pip install {missing[0]}, or pass --report-to none (metrics.jsonl is always written)"
        )
    return wanted


def make_accelerator(config: Config) -> Accelerator:
    """An Accelerator with the requested trackers, refusing ones that are not installed."""
    wanted = trackers(config)
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        log_with=wanted or None,  # type: ignore[arg-type]
        project_dir=str(config.run_dir / "trackers"),
    )


def checked_examples(
    config: Config, data_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> list[Example]:
    """The kept teacher responses, refused if another tokenizer wrote them or too few."""
    vocab_size = len(tokenizer)
    examples = load_examples(data_dir, config.kd_weight > 0, tokenizer, config.think_block)
    top = max(max(*e.prompt_ids, *e.response_ids) for e in examples)
    if top >= vocab_size:  # cross-entropy would clamp it: silent training on the wrong token
        raise DistillError(
            f"the teacher data in {data_dir} holds token id {top}, but the student's tokenizer "
            f"has {vocab_size} ids: the data was tokenized by another tokenizer; use a student "
            "that shares the teacher's tokenizer, or regenerate the data with it"
        )
    if len(examples) < config.batch_size:
        raise DistillError(
            f"{len(examples)} kept teacher responses are fewer than --batch-size "
            f"{config.batch_size}: lower --batch-size or generate more data"
        )
    return examples


def train(config: Config, ledger: GpuLedger, log: LogFn = no_log) -> Summary:
    """Fine-tune `config.student` on kept teacher responses; resumes from its last checkpoint."""
    accelerator = make_accelerator(config)
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % (config.micro_batch_size * world) != 0:
        raise DistillError(
            f"--batch-size {config.batch_size} must be a multiple of --micro-batch-size "
            f"{config.micro_batch_size} x {world} processes: every process runs the same "
            "number of micro-batches"
        )
    if (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and config.batch_size != config.micro_batch_size * world
    ):
        # DeepSpeed steps its engine inside accelerator.backward(): no accumulation of our own.
        raise DistillError(
            f"under DeepSpeed --batch-size must equal --micro-batch-size x {world} processes "
            f"(one micro-batch per process per step): use --micro-batch-size "
            f"{config.batch_size // world}, or FSDP for accumulation"
        )
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    lora_config = adapters.settings(config.lora_rank, config.lora_alpha, config.seed, sharded)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    out = config.run_dir / config.output / "checkpoint"
    data_dir = config.data_dir or config.run_dir / "teacher_data"
    resume = checkpoint.latest(out)
    source = str(resume) if resume else config.student
    tokenizer = AutoTokenizer.from_pretrained(source)
    # LoRA: the frozen base always comes from config.student; the checkpoint holds it merged.
    student = adapters.load(
        config.student,
        resume,
        resolve_dtype(config.dtype, config.student),
        lora_config,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    vocab_size = len(tokenizer)
    n_params = matmul_params(student)  # FLOPs: see distill/accounting.py
    n_trainable = matmul_params(student, trainable_only=True)  # LoRA: adapters
    params = adapters.trainable(student)  # every weight, or only the LoRA adapters
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95)
    )
    check_head(student, vocab_size, source)
    examples = checked_examples(config, data_dir, tokenizer)
    data_id = fingerprint(data_dir)
    epoch_steps = len(examples) // config.batch_size  # full batches only: no ragged last step
    start = 0
    rng_states: list[torch.Tensor] = []  # per process, from the checkpoint
    if resume:
        state = checkpoint.load_state(resume)
        if state.get("data", {}).get("fingerprint") != data_id:
            raise DistillError(
                f"the teacher data in {data_dir} changed since checkpoint {resume}: resuming "
                "would train on other batches; use a new --run-dir or restore the data"
            )
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise DistillError(
                "exact resume is implemented for single-process and DDP runs, not "
                f"{accelerator.distributed_type.value}: start a new --run-dir with "
                f"--student {resume}"
            )
        adapters.restore(student, state, resume)  # LoRA: the saved adapters onto the base
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"]) + 1
        rng_states = list(state["rng"])
        assert divmod(start, epoch_steps) == (state["data"]["epoch"], state["data"]["position"])
    student, optimizer = accelerator.prepare(student, optimizer)
    student.train()
    head = choose_head(config.fused_loss, accelerator, accelerator.unwrap_model(student))
    head_weight = accelerator.unwrap_model(student).get_output_embeddings().weight  # (V, H)
    if accelerator.is_main_process:
        built = manifest.setup(
            accelerator,
            dtype=head_weight.dtype,
            fused=head.fused,
            loss_reason=head.reason,
            lora_rank=config.lora_rank,
        )
        manifest.record_setup(config.run_dir, config.output, built)
    # The global RNG drives only dropout; seeded per process, restored exactly on resume.
    if rng_states:
        torch.set_rng_state(rng_states[rank % len(rng_states)])
    else:
        torch.manual_seed(config.seed * 1_000_003 + rank)
    accelerator.init_trackers(
        config.output, config={k: str(v) for k, v in config_dict(config).items()}
    )

    order: list[list[int]] = []  # the current epoch's batches, rebuilt from (seed, epoch)
    loss = float("nan")
    for step in range(start, config.steps):
        epoch, position = divmod(step, epoch_steps)
        if not order or position == 0:
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            order = step_batches([len(e) for e in examples], config.batch_size, g)
        chosen = [examples[i] for i in order[position]]
        mine = chosen[rank::world]
        micro = [
            collate(mine[i : i + config.micro_batch_size], pad_id=int(tokenizer.pad_token_id))
            for i in range(0, len(mine), config.micro_batch_size)
        ]
        n_tokens = global_target_tokens(micro, accelerator)
        loss_sum = torch.zeros(2, device=accelerator.device)  # (loss, ce) summed over tokens
        with ledger.phase("student.train", devices=world) as meter:
            for i, mb in enumerate(micro):
                mb = mb.to(accelerator.device)
                # Only the last micro-batch all-reduces gradients; the others accumulate locally.
                with nullcontext() if i == len(micro) - 1 else accelerator.no_sync(student):
                    if head.fused:  # the same loss and gradients (distill/fused_step.py)
                        share, total, ce = ce_topk_loss(
                            student, head_weight, mb, n_tokens, vocab_size,
                            kd_weight=config.kd_weight, kd_kind=config.kd_divergence,
                            workspace=head.workspace,
                        )  # fmt: skip
                    else:
                        total, ce = micro_batch_loss(student, mb, config, vocab_size)
                        share = total / n_tokens
                    accelerator.backward(share)
                loss_sum += torch.stack([total.detach(), ce.detach()])
                meter.add(
                    mb.n_targets,
                    train_flops(n_params, int(mb.attention_mask.sum()), trainable=n_trainable),
                )
            grad_norm = accelerator.clip_grad_norm_(student.parameters(), config.grad_clip)
            lr = lr_at(
                step,
                lr=config.lr,
                steps=config.steps,
                warmup=config.warmup_steps,
                min_ratio=config.min_lr_ratio,
            )
            set_lr(optimizer, lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sums = accelerator.reduce(loss_sum, reduction="sum")  # every process's tokens
        assert isinstance(sums, torch.Tensor)
        loss, ce_mean = (float(x) / (n_tokens * world) for x in sums.tolist())
        if step % config.log_every == 0 or step == config.steps - 1:
            metrics = {
                "loss": loss,
                "ce": ce_mean,
                "lr": lr,
                "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                "tokens": n_tokens * world,
                "epoch": epoch,
                "processes": world,
                "fused_loss": float(head.fused),
            }
            log(config.output, step + 1, config.steps, metrics)
            accelerator.log(metrics, step=step)
            if accelerator.is_main_process:
                record = {"phase": config.output, "step": step, **metrics}
                append_metrics(
                    config.run_dir, {**record, "device_hours": ledger.total_device_hours()}
                )
        if (step + 1) % config.save_every == 0 or step == config.steps - 1:
            if not accelerator.is_main_process:  # before _save's barrier: rank 0 merges it after
                ledger.save(config.run_dir / "ledger.json", rank=accelerator.process_index)
            where = (out, config.student)  # LoRA merges are saved in the student's own dtype
            _save(accelerator, student, optimizer, tokenizer, where, step, epoch_steps, data_id)
            if accelerator.is_main_process:
                ledger.save(config.run_dir / "ledger.json")
    accelerator.end_training()
    return Summary(steps=config.steps, final_loss=loss, checkpoint=out, examples=len(examples))


def _save(
    accelerator: Accelerator,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: PreTrainedTokenizerBase,
    where: tuple[Path, str],
    step: int,
    epoch_steps: int,
    data_id: str,
) -> None:
    """Every process joins (FSDP/ZeRO-3 gather weights, RNG states are gathered); rank 0 writes
    `where` = (checkpoint folder, the student it started from)."""
    out, student_source = where
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(student)
    # LoRA checkpoints are merged from the unwrapped model (sharded runs are refused for LoRA).
    weights = None if lora.is_wrapped(model) else accelerator.get_state_dict(student)
    rng = gather_object([torch.get_rng_state()])  # one per process, in rank order
    if accelerator.is_main_process:
        epoch, position = divmod(step + 1, epoch_steps)
        state = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": rng,
            "data": {"epoch": epoch, "position": position, "fingerprint": data_id},
            **adapters.state(model),
        }
        checkpoint.save(
            out, adapters.export(model, student_source), tokenizer, state, state_dict=weights
        )
    accelerator.wait_for_everyone()
