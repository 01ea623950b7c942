"""On-policy distillation: the student samples, the teacher scores those tokens, the student
minimises a divergence to the teacher at every position it produced.

    distill onpolicy --run-dir runs/demo

Default divergence: reverse KL(p_s‖p_t) on the teacher's top-k + tail support (docs/onpolicy.md
gives the argument). It is the divergence of the student's own samples: mode-seeking, the student
is pushed off tokens the teacher finds unlikely instead of spreading mass over every teacher
mode, which is what the Qwen3 report, GKD and MiniLLM use on-policy; on the coarsened support it
is a true divergence, never negative.

One step: [sync the sampler's weights] -> student.sample (G responses per prompt, per mode, with
the mode's sampling preset; `lmbda` of the slots take teacher rows instead) -> teacher.score (top-k
plus the actual token, one prefill) -> student.train (loss on sampled response tokens only:
prompt and forced tokens never carry loss) -> metrics, checkpoint.

`max_staleness` S >= 1: step k is sampled and scored ahead, in two threads (sampler, scorer),
from a frozen copy of weight version max(k - S, start), while the student trains (ahead.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from transformers import PreTrainedModel

from distill import adapters, loop, sampling
from distill.accounting import GpuLedger, forward_flops, teacher_flops, train_flops
from distill.batch import Batch, Example, collate
from distill.errors import DistillError
from distill.fused_loss import topk_loss
from distill.logits_loss import topk_divergence
from distill.loop import LogFn, no_log
from distill.onpolicy import ahead
from distill.onpolicy.ahead import Ahead, Produced
from distill.onpolicy.metrics import (
    Diagnostics,
    Lengths,
    accumulate,
    accumulate_rows,
    measured_mask,
)
from distill.onpolicy.rollout import OffPolicyRow, Rollout, check_request, load_rows, sample_slots
from distill.onpolicy.schedule import check_modes, position, step_slots
from distill.prompts import Prompt
from distill.rundir import prepare
from distill.sampling import SamplerKind, make_sampler, mode_params, mode_presets
from distill.seeds import derive_seed
from distill.validation import (
    AT_LEAST_1,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    check_budget,
    check_fields,
)
from losses import ALPHA, BETA, Divergence, DivergenceSpec
from students.dtype import TrainDTypeName
from students.placement import EnginePlacement
from students.sample import NON_THINKING_SAMPLING, THINKING_SAMPLING, Sampler, SamplingParams
from teachers.chat import BUDGET_SENTENCE, MODES, Mode
from teachers.protocol import Teacher

Truncation = Literal["mask", "drop", "keep"]


@dataclass(frozen=True, kw_only=True)
class Config:
    run_dir: Path
    student: str  # usually RUN_DIR/offpolicy/checkpoint
    output: str = "onpolicy"
    steps: Annotated[int, AT_LEAST_1] = 50
    prompts_per_step: Annotated[int, AT_LEAST_1] = 8  # slots per step; each gives G sequences
    samples_per_prompt: Annotated[int, AT_LEAST_1] = 2  # G
    micro_batch_size: Annotated[int, AT_LEAST_1] = 8
    modes: tuple[Mode, ...] = MODES
    # exact share of on-policy prompts in thinking mode (both modes on)
    think_ratio: Annotated[float, FRACTION] = 0.5
    soft_switch: bool = False  # /think, /no_think in the user turn (the model writes the block)
    max_tokens: Annotated[int, AT_LEAST_1] = 256
    # thinking tokens before the budget sentence is forced
    thinking_budget: Annotated[int, AT_LEAST_1] | None = None
    budget_sentence: str = BUDGET_SENTENCE
    top_k: Annotated[int, AT_LEAST_1] = 16  # teacher log-probs per position (vLLM: <= max_logprobs)
    divergence: Divergence = "reverse_kl"
    beta: Annotated[float, FRACTION] = BETA  # JSD(β): 0 forward KL, 1 reverse KL
    alpha: Annotated[float, Range(lo=0, hi=1, hi_open=True)] = ALPHA  # skew KL mixing weight
    # share of slots filled from the teacher's dataset (GKD's mixing)
    lmbda: Annotated[float, FRACTION] = 0.0
    data_dir: Path | None = None  # teacher rows for lmbda > 0; default RUN_DIR/teacher_data
    truncation: Truncation = "keep"  # responses at max_tokens: trained / no loss / not used
    sampler: SamplerKind = "auto"  # auto: vllm with CUDA and vllm installed, else hf
    # steps between weight pushes into a vllm sampler (hf: always current)
    sync_every: Annotated[int, AT_LEAST_1] = 1
    # weight versions a trained sequence may lag its sampler by; 0: sample, score, train in
    # series; >= 1: later steps are sampled and scored while the student trains (ahead.py)
    max_staleness: Annotated[int, NON_NEGATIVE] = 0
    engine: EnginePlacement = EnginePlacement()  # the vLLM sampler on GPUs: students/placement
    # an SFT-converged student: 5e-4 raised the very reverse KL it minimises
    lr: Annotated[float, NON_NEGATIVE] = 1e-4
    warmup_steps: int = 5
    min_lr_ratio: Annotated[float, FRACTION] = 0.1
    grad_clip: Annotated[float, POSITIVE] = 1.0
    dtype: TrainDTypeName = "auto"  # see students/dtype.py: precision
    gradient_checkpointing: bool = False  # recompute layer activations in the backward
    log_every: Annotated[int, AT_LEAST_1] = 1
    save_every: Annotated[int, AT_LEAST_1] = 25
    seed: int = 0
    lora_rank: int = 0  # > 0: rank-r LoRA adapters on a frozen base (distill/adapters.py)
    lora_alpha: Annotated[int, AT_LEAST_1] | None = None  # scale = alpha / rank; None: 2 x rank
    fused_loss: bool = True  # loss from hidden states in chunks, no (B, T, V) logits (fused_loss)
    think_sampling: SamplingParams = THINKING_SAMPLING
    no_think_sampling: SamplingParams = NON_THINKING_SAMPLING

    def __post_init__(self) -> None:
        check_fields(self)  # ranges and choices, from the field types above
        check_budget(self.thinking_budget, self.max_tokens)
        check_modes(self.modes, self.think_ratio, 0.0, [])  # the teacher's rows: at train time
        if self.max_staleness and self.sync_every > 1:
            raise DistillError(
                f"--sync-every {self.sync_every} with --max-staleness {self.max_staleness}: "
                "the staleness bound sets when the sampler gets weights; pass --sync-every 1"
            )

    @property
    def divergence_spec(self) -> DivergenceSpec:
        return DivergenceSpec(self.divergence, self.beta, self.alpha)


@dataclass(frozen=True, kw_only=True)
class Summary:
    steps: int
    final_loss: float
    checkpoint: Path
    metrics: dict[str, float]  # the last step's


def build_examples(rollouts: list[Rollout], truncation: Truncation) -> list[Example]:
    """Examples whose `train` mask covers sampled response tokens only.

    Prompt tokens are never targets (collate places `train` on response positions); forced
    tokens (the budget sentence, or teacher rows' forced ids) were not chosen by the student;
    a truncated response carries no loss under "mask" ("drop" removed it before scoring).
    """
    examples = []
    for r in rollouts:
        cut = r.generation.finish_reason == "length" and truncation == "mask"
        train = ~np.asarray(r.generation.forced, dtype=bool) & (not cut)
        examples.append(
            Example(
                prompt_ids=r.prompt_ids,
                response_ids=r.generation.token_ids.tolist(),
                train=train,
                topk=r.scores,
            )
        )
    return examples


def trainer_state(step: int, config: Config) -> dict[str, Any]:
    """What a resume needs beyond the weights and the optimizer; the LR schedule is a function
    of the step."""
    after = position(step + 1, config.prompts_per_step, config.lmbda)
    return {
        "step": step,
        "prompt_position": after.prompt,
        "offpolicy_position": after.offpolicy,
        "torch_rng": torch.get_rng_state(),
        # sampling seeds derive from (seed, step, mode): recorded, not needed to resume
        "sampler_seed_base": derive_seed(config.seed, (step + 1) * 2),
    }


def restore(state: dict[str, Any], resume: Path, config: Config) -> int:
    """The step to run next after checkpoint `resume` (its trainer `state` loaded: weights,
    adapters and optimizer are restored by `loop.load_trainee`); restores the RNG."""
    start = int(state["step"]) + 1
    if "torch_rng" in state:  # absent in checkpoints written before this loop recorded it
        torch.set_rng_state(state["torch_rng"])
    # The streams are functions of the step; the saved positions prove the plan is the same.
    here = position(start, config.prompts_per_step, config.lmbda)
    saved = (
        state.get("prompt_position", here.prompt),
        state.get("offpolicy_position", here.offpolicy),
    )
    if (here.prompt, here.offpolicy) != saved:
        raise DistillError(
            f"checkpoint {resume} was written by a run with another prompt plan (prompts_per_step "
            "or lmbda changed): use a new --run-dir, or delete that checkpoint to restart"
        )
    return start


def check_vocab(vocab_size: int, teacher: Teacher) -> None:
    if vocab_size != teacher.vocab_size:
        raise DistillError(
            f"the student's tokenizer has {vocab_size} ids, the teacher {teacher.name} "
            f"{teacher.vocab_size}: distil only into a student with the teacher's tokenizer"
        )


def micro_batch_loss(
    trainee: loop.Trainee,
    mb: Batch,
    n_tokens: float,
    divergence: DivergenceSpec,
    measured: torch.Tensor,
    diag: Diagnostics,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ mask·D / n_tokens to backward, Σ mask·D detached); adds the `measured` (B, T)
    positions to `diag`. Fused and logits paths give the same loss, gradients and diagnostics."""
    V = trainee.vocab_size
    if trainee.path.fused:  # the diagnostics read the loss's own chunks of logits
        observe = partial(accumulate_rows, diag, vocab_size=V)
        return topk_loss(
            trainee.model, trainee.head_weight, mb, n_tokens, divergence, V,
            measured=measured, observe=observe, workspace=trainee.path.workspace,
        )  # fmt: skip
    logits = trainee.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    per_token, _ = topk_divergence(logits, mb, divergence, V)  # (B, T-1), zero off the mask
    accumulate(diag, logits, mb, measured, V)
    return per_token.sum() / n_tokens, per_token.detach().sum()


def checked_rows(config: Config, teacher: Teacher, prompts: Sequence[Prompt]) -> list[OffPolicyRow]:
    """The teacher's rows for `lmbda` > 0 (none otherwise), once the request is checked: the
    teacher's top-k limit, the prompt set, the modes the rows and prompts can fill."""
    c = config
    check_request(c.top_k, c.lmbda, teacher, prompts)
    rows = load_rows(c.data_dir or c.run_dir / "teacher_data", c.modes) if c.lmbda > 0 else []
    check_modes(c.modes, c.think_ratio, c.lmbda, [r.mode for r in rows])
    return rows


def open_sampler(
    config: Config, model: PreTrainedModel, trainee: loop.Trainee, prompts: Sequence[Prompt]
) -> Sampler:
    """The student's sampler for `model`, sized for the prompts and run in the training dtype
    (what each weight sync sends)."""
    c = config
    return make_sampler(
        c.sampler, model, trainee.source, trainee.tokenizer, prompts, modes=c.modes,
        max_tokens=c.max_tokens, seed=c.seed, dtype=trainee.precision.compute,
        soft_switch=c.soft_switch, budget_sentence=c.budget_sentence, placement=c.engine,
    )  # fmt: skip


def score(teacher: Teacher, rollouts: Sequence[Rollout], top_k: int) -> list[Rollout]:
    """The rollouts with the teacher's top-k at every position of prompt + response (one
    prefill each; position t scores token t + 1)."""
    seqs = [[*r.prompt_ids, *r.generation.token_ids.tolist()] for r in rollouts]
    plens = [len(r.prompt_ids) for r in rollouts]
    scores = teacher.score(seqs, plens, top_k) if seqs else []
    return [replace(r, scores=s) for r, s in zip(rollouts, scores, strict=True)]


def micro_batches(
    rollouts: Sequence[Rollout], truncation: Truncation, size: int, pad_id: int
) -> list[tuple[Batch, torch.Tensor]]:
    """(micro-batch, measured (B, T)) pairs of `size` scored rollouts each, in order.

    `measured`: the sampled response positions (`metrics.measured_mask`), a superset of the loss
    mask: what the step's diagnostics average over."""
    examples = build_examples(list(rollouts), truncation)
    out = []
    for i in range(0, len(examples), size):
        part, forced = examples[i : i + size], [r.generation.forced for r in rollouts[i : i + size]]
        mb = collate(part, pad_id=pad_id)
        out.append((mb, measured_mask(part, forced, mb.input_ids.shape[1])))
    return out


def sample_step(
    c: Config,
    step: int,
    version: int,
    sampler: Sampler,
    *,
    trainee: loop.Trainee,
    prompts: Sequence[Prompt],
    rows: Sequence[OffPolicyRow],
    ledger: GpuLedger,
    rank: int,
    world: int,
    presets: dict[Mode, SamplingParams],
) -> Produced:
    """Step `step`'s slots (this process's share), sampled by `sampler` (weight `version`),
    metered; a truncation "drop" applied, so that nothing dropped is scored."""
    slots = step_slots(
        step=step, seed=c.seed, prompts_per_step=c.prompts_per_step,
        samples_per_prompt=c.samples_per_prompt, lmbda=c.lmbda, modes=c.modes,
        think_ratio=c.think_ratio, n_prompts=len(prompts), row_modes=[r.mode for r in rows],
    )  # fmt: skip
    with ledger.phase("student.sample", devices=world) as sample_meter:
        rollouts = sample_slots(
            slots[rank::world], sampler, trainee.tokenizer, prompts, rows,
            mode_params(presets, max_tokens=c.max_tokens, seed=c.seed, step=step),
            samples_per_prompt=c.samples_per_prompt, soft_switch=c.soft_switch,
            thinking_budget=c.thinking_budget, budget_sentence=c.budget_sentence,
        )  # fmt: skip
        n_sampled = sum(len(r.generation.token_ids) for r in rollouts if r.on_policy)
        sample_meter.add(n_sampled, forward_flops(trainee.n_params, n_sampled))
    lengths = Lengths.of(rollouts)
    if c.truncation == "drop":
        rollouts = [r for r in rollouts if r.generation.finish_reason != "length"]
    return Produced(
        step=step, slots=slots, lengths=lengths, n_sampled=n_sampled, n_scored=0,
        rollouts=[replace(r, version=version) for r in rollouts],
        sample_seconds=sample_meter.seconds, score_seconds=0.0,
    )  # fmt: skip


def score_step(batch: Produced, *, teacher: Teacher, top_k: int, ledger: GpuLedger) -> Produced:
    """The batch with the teacher's top-k on every rollout (`score`), metered."""
    with ledger.phase("teacher.score") as score_meter:
        rollouts = score(teacher, batch.rollouts, top_k)  # each with its (T, K) top-k
        n_scored = sum(len(r.prompt_ids) + len(r.generation.token_ids) for r in rollouts)
        score_meter.add(n_scored, teacher_flops(teacher, n_scored))
    return replace(batch, rollouts=rollouts, n_scored=n_scored, score_seconds=score_meter.seconds)


def train(
    config: Config,
    teacher: Teacher,
    prompts: list[Prompt],
    ledger: GpuLedger,
    log: LogFn = no_log,
    sampler: Sampler | None = None,
) -> Summary:
    """Student samples -> teacher scores -> student minimises the divergence; resumes exactly.

    `sampler`: an already running student sampler to reuse (it is synced to the student before
    the first step and left open); by default one is built from `config.sampler` and closed.
    """
    c = config
    lora_config = adapters.settings(c.lora_rank, c.lora_alpha, c.seed)
    rows = checked_rows(c, teacher, prompts)
    prepare(c.run_dir)
    accelerator, precision = loop.make_accelerator(c.dtype, c.student)
    world = loop.check_world(accelerator, c)
    out = c.run_dir / c.output / "checkpoint"
    trainee = loop.load_trainee(
        accelerator, student=c.student, out=out, precision=precision, lora_config=lora_config,
        lr=c.lr, fused_loss=c.fused_loss, gradient_checkpointing=c.gradient_checkpointing,
    )  # fmt: skip
    check_vocab(trainee.vocab_size, teacher)
    start = restore(trainee.state, trainee.resume, c) if trainee.resume else 0
    if start >= c.steps:  # finished before: nothing to sample, no engine to start
        return Summary(steps=c.steps, final_loss=float("nan"), checkpoint=out, metrics={})
    owned = sampler is None
    sampler = sampler or open_sampler(c, trainee.unwrapped(accelerator), trainee, prompts)
    described = sampling.describe(sampler, c.sync_every)
    loop.record_setup(accelerator, trainee, c.run_dir, c.output, c.lora_rank, described)
    sample = partial(
        sample_step, c, trainee=trainee, prompts=prompts, rows=rows, ledger=ledger,
        rank=accelerator.process_index, world=world,
        presets=mode_presets(c.think_sampling, c.no_think_sampling),
    )  # fmt: skip
    scored = partial(score_step, teacher=teacher, top_k=c.top_k, ledger=ledger)
    loss, metrics = float("nan"), {}
    source = Ahead(
        sample, scored, sampler, trainee.unwrapped(accelerator), start=start, steps=c.steps,
        max_staleness=c.max_staleness, sync_every=c.sync_every,
    )  # fmt: skip
    with source:  # stops the producer at a kill or the end
        for step in range(start, c.steps):
            t_step = time.perf_counter()
            batch = source.take(step)  # sampled and scored now (S = 0) or ahead (S >= 1)
            rollouts = batch.rollouts
            micro = micro_batches(rollouts, c.truncation, c.micro_batch_size, trainee.pad_id)
            n_tokens = loop.global_target_tokens([mb for mb, _ in micro], accelerator)
            total, diag, n_trained = torch.zeros(()), Diagnostics(), 0
            with ledger.phase("student.train", devices=world) as train_meter:
                for i, (mb, measured) in enumerate(micro):
                    mb = mb.to(accelerator.device)
                    # Only the last micro-batch all-reduces; the others accumulate locally.
                    with loop.sync_gradients(accelerator, trainee, last=i == len(micro) - 1):
                        share, summed = micro_batch_loss(
                            trainee, mb, n_tokens, c.divergence_spec, measured, diag
                        )  # share = sum / n_tokens: each backward adds its part of the step's mean
                        accelerator.backward(share)
                        total += summed.cpu()
                    n_seen = int(mb.attention_mask.sum())
                    n_trained += n_seen
                    flops = train_flops(trainee.n_params, n_seen, trainable=trainee.n_trainable)
                    train_meter.add(mb.n_targets, flops)
                grad_norm, lr = loop.optimizer_step(accelerator, trainee, step, c)
                source.publish(step + 1)  # version step + 1: snapshot it if a later step samples it
            loss = float(total) / (n_tokens * world)
            metrics = {
                "loss": loss,
                **diag.means(),
                **batch.lengths.means(),
                "offpolicy_fraction": sum(s.prompt is None for s in batch.slots) / len(batch.slots),
                "loss_tokens": float(sum(mb.n_targets for mb, _ in micro)),  # this process's
                "lr": lr,
                "fused_loss": float(trainee.path.fused),
                "grad_norm": grad_norm,
                "sample_tokens_per_s": batch.n_sampled / max(batch.sample_seconds, 1e-9),
                "score_tokens_per_s": batch.n_scored / max(batch.score_seconds, 1e-9),
                "train_tokens_per_s": n_trained / max(train_meter.seconds, 1e-9),
                "step_seconds": time.perf_counter() - t_step,
                **ahead.metrics(batch),  # staleness of the trained sequences, queue depth
                **source.synced,  # the latest weight sync into a vLLM sampler: GB, seconds
            }
            if step % c.log_every == 0 or step == c.steps - 1:
                loop.log_step(accelerator, ledger, log, c.run_dir, c.output, step, c.steps, metrics)
            if loop.due(step, c.save_every, c.steps):
                state = trainer_state(step, c)
                loop.save(accelerator, trainee, ledger, c.run_dir, out, c.student, state)
    if owned:
        sampling.close(sampler)
    return Summary(steps=c.steps, final_loss=loss, checkpoint=out, metrics=metrics)
