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
optimizer step, across micro-batches and processes (`loop.global_target_tokens`), so
accumulation and data parallelism give the gradient of one big batch.

Exact resume: the checkpoint holds the weights, the optimizer, the step (the schedule is a pure
function of it), every process's torch RNG state and the data position (epoch and batch, checked
against a fingerprint of the data). The batch order is rebuilt from (seed, epoch), so a resumed
run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedType, gather_object
from transformers import PreTrainedTokenizerBase

from distill import adapters, loop
from distill.accounting import GpuLedger, train_flops
from distill.batch import Batch, Example, collate, next_token_view, step_batches
from distill.errors import DistillError
from distill.fused_loss import ce_topk_loss
from distill.logits_loss import cross_entropy, topk_divergence
from distill.loop import LogFn, no_log
from distill.offpolicy.examples import fingerprint, load_examples
from distill.rundir import config_dict
from distill.seeds import derive_seed
from distill.validation import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, check_fields
from losses import Divergence, DivergenceSpec
from students.dtype import Precision, TrainDTypeName

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
    dtype: TrainDTypeName = "auto"  # see students/dtype.py: precision
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


def micro_batch_loss(
    student: torch.nn.Module, mb: Batch, config: Config, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed per-token loss, summed cross-entropy) of one micro-batch; the caller normalises."""
    logits = student(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits  # (B, T, V)
    shifted, targets, mask, _, _ = next_token_view(logits, mb)
    ce = cross_entropy(shifted, targets, vocab_size) * mask  # (B, T-1): response targets only
    per_token = ce
    if config.kd_weight > 0:
        kd_spec = DivergenceSpec(config.kd_divergence)
        kd, _ = topk_divergence(logits, mb, kd_spec, vocab_size)  # (B, T-1), masked
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


def make_accelerator(config: Config) -> tuple[Accelerator, Precision]:
    """An Accelerator with the requested trackers (refusing ones that are not installed) and the
    training precision (`loop.make_accelerator`)."""
    wanted = trackers(config)
    return loop.make_accelerator(
        config.dtype,
        config.student,
        log_with=wanted or None,
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


def check_world(config: Config, accelerator: Accelerator) -> None:
    """The batch splits into the same number of micro-batches on every process."""
    world = accelerator.num_processes
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


def restore(
    trainee: loop.Trainee, accelerator: Accelerator, data_dir: Path, data_id: str, epoch_steps: int
) -> int:
    """The step to run next after the checkpoint `trainee` resumed from; restores this
    process's RNG. Refuses changed data, and sharded runs (not resumable exactly)."""
    state, resume = trainee.state, trainee.resume
    if state.get("data", {}).get("fingerprint") != data_id:
        raise DistillError(
            f"the teacher data in {data_dir} changed since checkpoint {resume}: resuming "
            "would train on other batches; use a new --run-dir or restore the data"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise DistillError(
            "exact resume is implemented for single-process, DDP and FSDP runs, not DeepSpeed: "
            f"start a new --run-dir with --student {resume}"
        )
    start = int(state["step"]) + 1
    assert divmod(start, epoch_steps) == (state["data"]["epoch"], state["data"]["position"])
    rng_states = list(state["rng"])  # one per process of the run that saved it
    torch.set_rng_state(rng_states[accelerator.process_index % len(rng_states)])
    return start


def trainer_state(step: int, epoch_steps: int, data_id: str) -> dict[str, Any]:
    """What a resume needs beyond weights and optimizer; every process joins (RNG gather)."""
    epoch, position = divmod(step + 1, epoch_steps)
    return {
        "step": step,
        "rng": gather_object([torch.get_rng_state()]),  # one per process, in rank order
        "data": {"epoch": epoch, "position": position, "fingerprint": data_id},
    }


def train(config: Config, ledger: GpuLedger, log: LogFn = no_log) -> Summary:
    """Fine-tune `config.student` on kept teacher responses; resumes from its last checkpoint."""
    c = config
    accelerator, precision = make_accelerator(c)
    world, rank = accelerator.num_processes, accelerator.process_index
    check_world(c, accelerator)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    lora_config = adapters.settings(c.lora_rank, c.lora_alpha, c.seed, sharded)
    c.run_dir.mkdir(parents=True, exist_ok=True)
    out = c.run_dir / c.output / "checkpoint"
    data_dir = c.data_dir or c.run_dir / "teacher_data"
    trainee = loop.load_trainee(
        accelerator, student=c.student, out=out, precision=precision, lora_config=lora_config,
        lr=c.lr, weight_decay=c.weight_decay, fused_loss=c.fused_loss,
        gradient_checkpointing=c.gradient_checkpointing,
    )  # fmt: skip
    examples = checked_examples(c, data_dir, trainee.tokenizer)
    data_id = fingerprint(data_dir)
    epoch_steps = len(examples) // c.batch_size  # full batches only: no ragged last step
    # The global RNG drives only dropout; seeded per process, restored exactly on resume.
    if trainee.resume:
        start = restore(trainee, accelerator, data_dir, data_id, epoch_steps)
    else:
        start = 0
        torch.manual_seed(derive_seed(c.seed, rank))
    loop.record_setup(accelerator, trainee, c.run_dir, c.output, c.lora_rank)
    accelerator.init_trackers(c.output, config={k: str(v) for k, v in config_dict(c).items()})
    V, order, loss = trainee.vocab_size, [], float("nan")  # order: this epoch's batches
    for step in range(start, c.steps):
        epoch, position = divmod(step, epoch_steps)
        if not order or position == 0:  # rebuilt from (seed, epoch): the same after a resume
            g = torch.Generator().manual_seed(derive_seed(c.seed, epoch))
            order = step_batches([len(e) for e in examples], c.batch_size, g)
        mine = [examples[i] for i in order[position]][rank::world]
        micro = [
            collate(mine[i : i + c.micro_batch_size], pad_id=trainee.pad_id)
            for i in range(0, len(mine), c.micro_batch_size)
        ]
        n_tokens = loop.global_target_tokens(micro, accelerator)
        loss_sum = torch.zeros(2, device=accelerator.device)  # (loss, ce) summed over tokens
        with ledger.phase("student.train", devices=world) as meter:
            for i, mb in enumerate(micro):
                mb = mb.to(accelerator.device)
                with loop.sync_gradients(accelerator, trainee, last=i == len(micro) - 1):
                    if trainee.path.fused:  # the same loss and gradients (distill/fused_loss.py)
                        share, total, ce = ce_topk_loss(
                            trainee.model, trainee.head_weight, mb, n_tokens, V,
                            kd_weight=c.kd_weight, kd_divergence=c.kd_divergence,
                            workspace=trainee.path.workspace,
                        )  # fmt: skip
                    else:
                        total, ce = micro_batch_loss(trainee.model, mb, c, V)
                        share = total / n_tokens
                    accelerator.backward(share)
                loss_sum += torch.stack([total.detach(), ce.detach()])
                n_seen = int(mb.attention_mask.sum())
                flops = train_flops(trainee.n_params, n_seen, trainable=trainee.n_trainable)
                meter.add(mb.n_targets, flops)
            grad_norm, lr = loop.optimizer_step(accelerator, trainee, step, c)
        sums = accelerator.reduce(loss_sum, reduction="sum")  # every process's tokens
        assert isinstance(sums, torch.Tensor)
        loss, ce_mean = (float(x) / (n_tokens * world) for x in sums.tolist())
        if step % c.log_every == 0 or step == c.steps - 1:
            metrics = {
                "loss": loss, "ce": ce_mean, "lr": lr, "grad_norm": grad_norm,
                "tokens": n_tokens * world, "epoch": epoch, "processes": world,
                "fused_loss": float(trainee.path.fused),
            }  # fmt: skip
            loop.log_step(accelerator, ledger, log, c.run_dir, c.output, step, c.steps, metrics)
            accelerator.log(metrics, step=step)
        if loop.due(step, c.save_every, c.steps):
            state = trainer_state(step, epoch_steps, data_id)
            loop.save(accelerator, trainee, ledger, c.run_dir, out, c.student, state)
    accelerator.end_training()
    return Summary(steps=c.steps, final_loss=loss, checkpoint=out, examples=len(examples))
