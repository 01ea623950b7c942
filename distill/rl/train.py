"""The RL baseline: GRPO with a verifiable reward, on the same student and prompts as distillation.

    distill rl --run-dir runs/rl --student runs/default/offpolicy/checkpoint

Each step the student samples G responses to each prompt with the sampler on-policy distillation
uses (distill/sampling.py: `--sampler auto|hf|vllm`, the vLLM engine's weights synced in place
every `--sync-every` steps), a checker scores them (answer correctness, optional format bonus),
and the student follows the policy gradient of its own tokens weighted by group-relative
advantages. The update takes the distillation loops' paths too: LoRA adapters (distill/adapters.py),
the loss from hidden states in chunks (distill/fused_loss.py), accelerate's DDP/FSDP/ZeRO-3.
One update per batch of samples, so the policy that sampled is the policy that is updated: the
PPO ratio is exactly 1 and needs no clipping or old-policy forward. No reference-model KL term
(as DAPO and Dr. GRPO): the comparison with distillation is then RL's own cheapest form.

Every phase goes through the run's GpuLedger, student.sample / student.train / eval, so the RL
device-hours and the distillation device-hours come from one meter (docs/accounting.md says why
this loop and not TRL's GRPOTrainer); manifest.json records how the phase was built, and
`report compare` warns where an RL run and a distillation run were built differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill import adapters, evaluate, loop, sampling
from distill.accounting import GpuLedger, forward_flops, train_flops
from distill.batch import Batch, Example, collate, next_token_view
from distill.errors import DistillError
from distill.fused_loss import policy_gradient_loss
from distill.logits_loss import cross_entropy
from distill.loop import LogFn, no_log
from distill.prompts import Prompt
from distill.rl.reward import group_advantages, well_formed
from distill.rundir import append_metrics, atomic_write_json, read_json
from distill.sampling import (
    SamplerKind,
    make_sampler,
    mode_params,
    mode_presets,
    sample_modes,
    sync_due,
)
from distill.seeds import derive_seed
from distill.tasks import verify
from distill.validation import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, check_fields
from students.dtype import TrainDTypeName
from students.placement import EnginePlacement
from students.sample import NON_THINKING_SAMPLING, THINKING_SAMPLING, Sampler, SamplingParams
from teachers.chat import MODES, Mode, render_prompt


@dataclass(frozen=True, kw_only=True)
class Config:
    run_dir: Path
    student: str  # usually the off-policy checkpoint, the starting point of on-policy too
    output: str = "rl"
    steps: Annotated[int, AT_LEAST_1] = 50
    prompts_per_step: Annotated[int, AT_LEAST_1] = 4
    samples_per_prompt: Annotated[int, AT_LEAST_1] = 8  # G: the group each advantage is relative to
    micro_batch_size: Annotated[int, AT_LEAST_1] = 16
    modes: tuple[Mode, ...] = MODES
    think_ratio: Annotated[float, FRACTION] = 0.5  # share in thinking mode when both modes are on
    soft_switch: bool = False  # /think, /no_think in the user turn (the model writes the block)
    max_tokens: Annotated[int, AT_LEAST_1] = 96
    # reward for a well-formed response, on top of correctness
    format_weight: Annotated[float, NON_NEGATIVE] = 0.0
    scale_by_std: bool = True  # GRPO; False: Dr. GRPO (centred rewards only)
    # by its own objective: 2e-4 left the mean reward flat and drifted the policy
    lr: Annotated[float, NON_NEGATIVE] = 5e-5
    warmup_steps: int = 5
    min_lr_ratio: Annotated[float, FRACTION] = 0.1
    grad_clip: Annotated[float, POSITIVE] = 1.0
    dtype: TrainDTypeName = "auto"  # see students/dtype.py: precision
    gradient_checkpointing: bool = False  # recompute layer activations in the backward
    log_every: Annotated[int, AT_LEAST_1] = 5
    save_every: Annotated[int, AT_LEAST_1] = 25
    eval_every: int = 0  # 0: evaluate before the first step and after the last only
    seed: int = 0
    sampler: SamplerKind = "auto"  # as on-policy: vllm with CUDA and vllm installed, else hf
    # steps between weight pushes into a vllm sampler (hf: always current)
    sync_every: Annotated[int, AT_LEAST_1] = 1
    engine: EnginePlacement = EnginePlacement()  # the vLLM sampler on GPUs: students/placement
    lora_rank: int = 0  # > 0: rank-r LoRA adapters on a frozen base (distill/adapters.py)
    lora_alpha: Annotated[int, AT_LEAST_1] | None = None  # scale = alpha / rank; None: 2 x rank
    fused_loss: bool = True  # loss from hidden states in chunks, no (B, T, V) logits (fused_loss)
    think_sampling: SamplingParams = THINKING_SAMPLING
    no_think_sampling: SamplingParams = NON_THINKING_SAMPLING

    def __post_init__(self) -> None:
        check_fields(self)  # ranges and choices, from the field types above


@dataclass(frozen=True, kw_only=True)
class Summary:
    steps: int
    final_reward: float
    checkpoint: Path
    evals: dict[str, dict[str, float]]


def step_prompts(config: Config, prompts: Sequence[Prompt], step: int) -> list[tuple[Prompt, Mode]]:
    """The prompts and modes of one step, from a generator seeded by (seed, step): resumable."""
    g = torch.Generator().manual_seed(derive_seed(config.seed, step))
    picks = torch.randint(len(prompts), (config.prompts_per_step,), generator=g).tolist()
    coins = torch.rand(config.prompts_per_step, generator=g).tolist()
    if len(config.modes) == 1:
        return [(prompts[i], config.modes[0]) for i in picks]
    return [
        (prompts[i], "think" if c < config.think_ratio else "no_think")
        for i, c in zip(picks, coins, strict=True)
    ]


def measure(
    model: PreTrainedModel,
    tokenizer: object,
    eval_prompts: Sequence[Prompt],
    modes: Sequence[Mode],
    config: evaluate.Config,
    ledger: GpuLedger,
) -> dict[str, float]:
    """Greedy accuracy per mode on the held-out prompts: the metric the pipeline reports too."""
    was_training = model.training
    out = {
        f"accuracy_{mode}": evaluate.accuracy(model, tokenizer, eval_prompts, mode, config, ledger)  # type: ignore[arg-type]
        for mode in modes
    }
    model.train(was_training)
    return out


def logits_loss(
    student: torch.nn.Module, mb: Batch, advantages: torch.Tensor, n_tokens: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ mask·A·(-log π(y_t)) / n_tokens to backward, the same sum detached) from full logits;
    `fused_loss.policy_gradient_loss` is its twin without (B, T, V) logits."""
    logits = student(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits  # (B, T, V)
    logits, targets, mask, _, _ = next_token_view(logits, mb)  # (B, T-1, V), (B, T-1)
    neg_logp = cross_entropy(logits, targets, vocab_size)  # (B, T-1): -log π(y_t)
    # ∇ of Σ_t A·(-log π) is minus the policy gradient: descending it raises the log-probability
    # of tokens in better-than-average responses
    per_token = (advantages[:, None] * neg_logp).masked_fill(~mask, 0.0)  # (B, T-1)
    return per_token.sum() / n_tokens, per_token.detach().sum()


def micro_batch_loss(
    trainee: loop.Trainee, mb: Batch, advantages: torch.Tensor, n_tokens: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy-gradient loss of one micro-batch on the run's loss path (same values)."""
    if trainee.path.fused:
        return policy_gradient_loss(
            trainee.model, trainee.head_weight, mb, advantages, n_tokens, trainee.vocab_size,
            workspace=trainee.path.workspace,
        )  # fmt: skip
    return logits_loss(trainee.model, mb, advantages, n_tokens, trainee.vocab_size)


def check_request(config: Config, prompts: Sequence[Prompt]) -> None:
    """Refuse what the config alone cannot (its ranges and choices were checked when it was
    built): a training prompt without a reference answer."""
    if any(p.answer is None for p in prompts):
        raise DistillError(
            "RL needs a reference answer for every training prompt (the reward checks it): "
            "pass --answer-column naming the answers, or filter out prompts without one"
        )


def rendered(
    config: Config, tokenizer: PreTrainedTokenizerBase, mine: Sequence[tuple[Prompt, Mode]]
) -> tuple[list[list[int]], list[Mode]]:
    """(prompt ids, modes) of G contiguous copies per prompt: row p * G + g is sample g of p."""
    G = config.samples_per_prompt
    ids = [render_prompt(tokenizer, p.messages, m, config.soft_switch) for p, m in mine]
    return [i for i in ids for _ in range(G)], [m for _, m in mine for _ in range(G)]


def rewards_of(
    config: Config, texts: Sequence[str], mine: Sequence[tuple[Prompt, Mode]]
) -> tuple[torch.Tensor, list[bool], list[bool]]:
    """((P, G) rewards, correct, well-formed) of the step's responses, prompt-major."""
    G = config.samples_per_prompt
    answers = [str(p.answer) for p, _ in mine for _ in range(G)]
    modes: list[Mode] = [mode for _, mode in mine for _ in range(G)]
    correct = [verify(t, a) for t, a in zip(texts, answers, strict=True)]
    formed = [well_formed(t, m) for t, m in zip(texts, modes, strict=True)]
    rewards = torch.tensor(correct, dtype=torch.float32) + config.format_weight * torch.tensor(
        formed, dtype=torch.float32
    )
    return rewards.view(len(mine), G), correct, formed


def evaluate_stage(
    stage: str,
    model: PreTrainedModel,
    tokenizer: object,
    eval_prompts: Sequence[Prompt],
    config: Config,
    eval_config: evaluate.Config,
    ledger: GpuLedger,
    evals: dict[str, dict[str, float]],
    accelerator: Accelerator,
    step: int,
) -> None:
    """Measure greedy accuracy as `stage`, charged to the ledger, kept in RUN_DIR/eval.json."""
    ledger.mark(stage)  # device-hours spent before this measurement
    evals[stage] = measure(model, tokenizer, eval_prompts, config.modes, eval_config, ledger)
    if accelerator.is_main_process:
        atomic_write_json(config.run_dir / "eval.json", evals)
        if stage != "before":
            record = {"phase": f"{config.output}.eval", "step": step, **evals[stage]}
            append_metrics(config.run_dir, {**record, "device_hours": ledger.total_device_hours()})


def train(
    config: Config,
    prompts: Sequence[Prompt],
    eval_prompts: Sequence[Prompt],
    eval_config: evaluate.Config,
    ledger: GpuLedger,
    log: LogFn = no_log,
    sampler: Sampler | None = None,
) -> Summary:
    """Sample G per prompt -> reward -> group-relative advantages -> policy gradient; resumable.

    `sampler`: an already running student sampler to reuse (it is synced to the student before
    the first step and left open); by default one is built from `config.sampler` and closed.
    """
    c = config
    check_request(c, prompts)
    accelerator, precision = loop.make_accelerator(c.dtype, c.student)
    world = loop.check_world(accelerator, c, even=True)  # RL's groups: whole on one process
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    lora_config = adapters.settings(c.lora_rank, c.lora_alpha, c.seed, sharded)
    out = c.run_dir / c.output / "checkpoint"
    trainee = loop.load_trainee(
        accelerator, student=c.student, out=out, precision=precision, lora_config=lora_config,
        lr=c.lr, fused_loss=c.fused_loss, gradient_checkpointing=c.gradient_checkpointing,
    )  # fmt: skip
    start = int(trainee.state["step"]) + 1 if trainee.resume else 0
    model, tokenizer = trainee.unwrapped(accelerator), trainee.tokenizer
    evals: dict[str, dict[str, float]] = read_json(c.run_dir / "eval.json", default={})
    if start >= c.steps:  # finished before: nothing to sample, no engine to start
        return Summary(steps=c.steps, final_reward=float("nan"), checkpoint=out, evals=evals)
    owned = sampler is None
    sampler = sampler or make_sampler(
        c.sampler, model, trainee.source, tokenizer, prompts, modes=c.modes,
        max_tokens=c.max_tokens, seed=c.seed, soft_switch=c.soft_switch, placement=c.engine,
        dtype=precision.compute,  # the forward's dtype: what each sync sends
    )  # fmt: skip
    described = sampling.describe(sampler, c.sync_every)
    loop.record_setup(accelerator, trainee, c.run_dir, c.output, c.lora_rank, described)
    presets = mode_presets(c.think_sampling, c.no_think_sampling)
    stage_args = (model, tokenizer, eval_prompts, c, eval_config, ledger, evals, accelerator)
    mean_reward, synced = float("nan"), None
    for step in range(start, c.steps):
        if step == 0 and "before" not in evals:
            evaluate_stage("before", *stage_args, step)
        synced = sampler.sync(model) if sync_due(step, start, c.sync_every) else synced
        mine = step_prompts(c, prompts, step)[accelerator.process_index :: world]
        prompt_ids, modes = rendered(c, tokenizer, mine)  # G contiguous copies of each prompt
        with ledger.phase("student.sample", devices=world) as sample_meter:
            params = mode_params(presets, max_tokens=c.max_tokens, seed=c.seed, step=step)
            gens = sample_modes(sampler, tokenizer, prompt_ids, modes, params)
            n_sampled = sum(len(g.token_ids) for g in gens)
            sample_meter.add(n_sampled, forward_flops(trainee.n_params, n_sampled))
        texts = [str(tokenizer.decode(g.token_ids, skip_special_tokens=True)) for g in gens]
        rewards, correct, formed = rewards_of(c, texts, mine)  # (P, G)
        advantages = group_advantages(rewards, c.scale_by_std).flatten()  # (P*G,)
        examples = [
            Example(prompt_ids=ids, response_ids=g.token_ids.tolist(), train=~g.forced)
            for ids, g in zip(prompt_ids, gens, strict=True)
        ]
        chunks = range(0, len(examples), c.micro_batch_size)
        micro = [collate(examples[s : s + c.micro_batch_size], trainee.pad_id) for s in chunks]
        norm = loop.global_target_tokens(micro, accelerator)
        objective = torch.zeros(())
        with ledger.phase("student.train", devices=world) as meter:
            for j, (s, mb) in enumerate(zip(chunks, micro, strict=True)):
                mb = mb.to(accelerator.device)
                adv = advantages[s : s + c.micro_batch_size].to(accelerator.device)  # (B,)
                with loop.sync_gradients(accelerator, trainee, last=j == len(micro) - 1):
                    share, summed = micro_batch_loss(trainee, mb, adv, norm)
                    accelerator.backward(share)
                    objective += summed.cpu()
                n_seen = int(mb.attention_mask.sum())
                flops = train_flops(trainee.n_params, n_seen, trainable=trainee.n_trainable)
                meter.add(mb.n_targets, flops)
            grad_norm, lr = loop.optimizer_step(accelerator, trainee, step, c)
        mean_reward = float(rewards.mean())
        last = step == c.steps - 1
        if step % c.log_every == 0 or last:
            metrics = {
                "reward": mean_reward,
                "correct": float(np.mean(correct)),
                "well_formed": float(np.mean(formed)),
                "no_signal_groups": float((rewards.std(dim=1) == 0).float().mean()),
                "objective": float(objective) / (norm * world),
                "grad_norm": grad_norm,
                "lr": lr,
                "fused_loss": float(trainee.path.fused),
                "response_len": float(np.mean([len(g.token_ids) for g in gens])),
                "sample_tokens_per_s": n_sampled / max(sample_meter.seconds, 1e-9),
                **(synced.metrics() if synced else {}),  # the latest weight sync: GB, seconds
            }
            loop.log_step(accelerator, ledger, log, c.run_dir, c.output, step, c.steps, metrics)
        if last or (c.eval_every and (step + 1) % c.eval_every == 0):
            evaluate_stage("after_rl" if last else f"rl_step_{step + 1}", *stage_args, step)
        if loop.due(step, c.save_every, c.steps):
            loop.save(accelerator, trainee, ledger, c.run_dir, out, c.student, {"step": step})
    if owned:
        sampling.close(sampler)
    return Summary(steps=c.steps, final_reward=mean_reward, checkpoint=out, evals=evals)
