"""The RL baseline: GRPO with a verifiable reward, on the same student and prompts as distillation.

    distill rl --run-dir runs/rl --student runs/default/offpolicy/checkpoint

Each step the student samples G responses to each prompt with the sampler on-policy distillation
uses (distill/sampling.py: `--sampler auto|hf|vllm`, the vLLM engine's weights synced in place
every `--sync-every` steps), a checker scores them (answer correctness, optional format bonus),
and the student follows the policy gradient of its own tokens weighted by group-relative
advantages. The update takes the distillation loops' paths too: LoRA adapters (distill/adapters.py),
the loss from hidden states in chunks (distill/fused_step.py), accelerate's DDP/FSDP/ZeRO-3.
One update per batch of samples, so the policy that sampled is the policy that is updated: the
PPO ratio is exactly 1 and needs no clipping or old-policy forward. No reference-model KL term
(as DAPO and Dr. GRPO): the comparison with distillation is then RL's own cheapest form.

Every phase goes through the run's GpuLedger, student.sample / student.train / eval, so the RL
device-hours and the distillation device-hours come from one meter (docs/accounting.md says why
this loop and not TRL's GRPOTrainer); manifest.json records how the phase was built, and
`report compare` warns where an RL run and a distillation run were built differently.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import AutoTokenizer, PreTrainedModel

from distill import adapters, checkpoint, evaluate, manifest, sampling
from distill.accounting import GpuLedger, forward_flops, matmul_params, train_flops
from distill.batch import Batch, Example, collate, next_token_view
from distill.errors import DistillError
from distill.fused_step import choose_head, policy_gradient_loss
from distill.objective import (
    Dtype,
    LogFn,
    cross_entropy,
    global_target_tokens,
    lr_at,
    no_log,
    resolve_dtype,
    set_lr,
)
from distill.offpolicy.filters import verify
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
from distill.validation import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, check_fields
from students.dtype import resolve_name
from students.placement import EnginePlacement
from students.sample import Sampler
from teachers.chat import MODES, Mode, render_prompt
from teachers.protocol import NON_THINKING_SAMPLING, THINKING_SAMPLING, SamplingParams


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
    max_tokens: Annotated[int, AT_LEAST_1] = 256
    # reward for a well-formed response, on top of correctness
    format_weight: Annotated[float, NON_NEGATIVE] = 0.0
    scale_by_std: bool = True  # GRPO; False: Dr. GRPO (centred rewards only)
    # by its own objective: 2e-4 left the mean reward flat and drifted the policy
    lr: Annotated[float, NON_NEGATIVE] = 5e-5
    warmup_steps: int = 5
    min_lr_ratio: Annotated[float, FRACTION] = 0.1
    grad_clip: Annotated[float, POSITIVE] = 1.0
    dtype: Dtype = "auto"
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
    fused_loss: bool = True  # loss from hidden states in chunks, no (B, T, V) logits (fused_step)
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
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
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
    `fused_step.policy_gradient_loss` is its twin without (B, T, V) logits."""
    logits = student(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits  # (B, T, V)
    logits, targets, mask, _, _ = next_token_view(logits, mb)  # (B, T-1, V), (B, T-1)
    neg_logp = cross_entropy(logits, targets, vocab_size)  # (B, T-1): -log π(y_t)
    # ∇ of Σ_t A·(-log π) is minus the policy gradient: descending it raises the log-probability
    # of tokens in better-than-average responses
    per_token = (advantages[:, None] * neg_logp).masked_fill(~mask, 0.0)  # (B, T-1)
    return per_token.sum() / n_tokens, per_token.detach().sum()


def check_request(config: Config, prompts: Sequence[Prompt]) -> None:
    """Refuse what the config alone cannot (its ranges and choices were checked when it was
    built): a training prompt without a reference answer."""
    if any(p.answer is None for p in prompts):
        raise DistillError(
            "RL needs a reference answer for every training prompt (the reward checks it): "
            "pass --answer-column naming the answers, or filter out prompts without one"
        )


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
    check_request(config, prompts)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if config.prompts_per_step % accelerator.num_processes:
        raise DistillError(
            f"--prompts-per-step {config.prompts_per_step} does not split evenly over "
            f"{accelerator.num_processes} processes: use a multiple of the process count"
        )
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    lora_config = adapters.settings(config.lora_rank, config.lora_alpha, config.seed, sharded)
    out = config.run_dir / config.output / "checkpoint"
    resume = checkpoint.latest(out)
    source = str(resume) if resume else config.student
    tokenizer = AutoTokenizer.from_pretrained(source)
    # LoRA: the frozen base always comes from config.student; the checkpoint holds it merged.
    dtype = resolve_dtype(config.dtype, config.student)
    student = adapters.load(config.student, resume, dtype, lora_config)
    pad_id, vocab_size = int(tokenizer.pad_token_id), len(tokenizer)
    n_params = matmul_params(student)  # FLOPs: see distill/accounting.py
    n_trainable = matmul_params(student, trainable_only=True)  # LoRA: adapters
    params = adapters.trainable(student)  # every weight, or only the LoRA adapters
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.95))
    start = 0
    if resume:
        state = checkpoint.load_state(resume)
        adapters.restore(student, state, resume)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"]) + 1
    student, optimizer = accelerator.prepare(student, optimizer)
    student.train()
    model = accelerator.unwrap_model(student)
    head = choose_head(config.fused_loss, accelerator, model)
    head_weight = model.get_output_embeddings().weight  # (V, H)
    G = config.samples_per_prompt
    evals_path = config.run_dir / "eval.json"
    evals: dict[str, dict[str, float]] = read_json(evals_path) if evals_path.exists() else {}
    if start >= config.steps:  # finished before: nothing to sample, no engine to start
        return Summary(steps=config.steps, final_reward=float("nan"), checkpoint=out, evals=evals)
    owned = sampler is None
    if sampler is None:
        sampler = make_sampler(
            config.sampler,
            model,
            source,
            tokenizer,
            prompts,
            modes=config.modes,
            max_tokens=config.max_tokens,
            seed=config.seed,
            dtype=resolve_name(config.dtype, config.student),  # the training dtype
            soft_switch=config.soft_switch,
            placement=config.engine,
        )
    if accelerator.is_main_process:  # what `report compare` checks against distillation runs
        built = manifest.setup(
            accelerator,
            dtype=head_weight.dtype,
            fused=head.fused,
            loss_reason=head.reason,
            lora_rank=config.lora_rank,
            sampler=sampling.describe(sampler, config.sync_every),
        )
        manifest.record_setup(config.run_dir, config.output, built)
    presets = mode_presets(config.think_sampling, config.no_think_sampling)
    mean_reward = float("nan")
    for step in range(start, config.steps):
        if step == 0 and "before" not in evals:
            ledger.mark("before")
            evals["before"] = measure(
                model, tokenizer, eval_prompts, config.modes, eval_config, ledger
            )
            if accelerator.is_main_process:
                atomic_write_json(evals_path, evals)
        if sync_due(step, start, config.sync_every):
            sampler.sync(model)
        chosen = step_prompts(config, prompts, step)
        mine = chosen[accelerator.process_index :: accelerator.num_processes]
        # G copies of each prompt, contiguous: row p * G + g is sample g of prompt p
        prompt_ids = [
            render_prompt(tokenizer, p.messages, mode, config.soft_switch)
            for p, mode in mine
            for _ in range(G)
        ]
        modes: list[Mode] = [mode for _, mode in mine for _ in range(G)]
        with ledger.phase("student.sample", devices=accelerator.num_processes) as meter:
            t0 = time.perf_counter()
            step_params = mode_params(
                presets, max_tokens=config.max_tokens, seed=config.seed, step=step
            )
            gens = sample_modes(sampler, tokenizer, prompt_ids, modes, step_params)
            n_sampled = sum(len(g.token_ids) for g in gens)
            meter.add(n_sampled, forward_flops(n_params, n_sampled))
            t_sample = time.perf_counter() - t0
        texts = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gens]
        answers = [str(p.answer) for p, _ in mine for _ in range(G)]
        correct = [verify(t, a) for t, a in zip(texts, answers, strict=True)]
        formed = [well_formed(t, m) for t, m in zip(texts, modes, strict=True)]
        rewards = (
            torch.tensor(correct, dtype=torch.float32)
            + config.format_weight * torch.tensor(formed, dtype=torch.float32)
        ).view(len(mine), G)  # (P, G)
        advantages = group_advantages(rewards, config.scale_by_std).flatten()  # (P*G,)
        examples = [
            Example(
                prompt_ids=prompt_ids[i],
                response_ids=gens[i].token_ids.tolist(),
                train=~gens[i].forced,
            )
            for i in range(len(gens))
        ]
        chunks = range(0, len(examples), config.micro_batch_size)
        micro = [collate(examples[s : s + config.micro_batch_size], pad_id) for s in chunks]
        # DDP averages gradients over processes: divide by (global tokens / world size)
        norm = global_target_tokens(micro, accelerator)
        objective = torch.zeros(())
        with ledger.phase("student.train", devices=accelerator.num_processes) as meter:
            for j, (s, mb) in enumerate(zip(chunks, micro, strict=True)):
                mb = mb.to(accelerator.device)
                adv = advantages[s : s + config.micro_batch_size].to(accelerator.device)  # (B,)
                with nullcontext() if j == len(micro) - 1 else accelerator.no_sync(student):
                    if head.fused:  # the same loss and gradients (distill/fused_step.py)
                        share, summed = policy_gradient_loss(
                            student, head_weight, mb, adv, norm, vocab_size,
                            workspace=head.workspace,
                        )  # fmt: skip
                    else:
                        share, summed = logits_loss(student, mb, adv, norm, vocab_size)
                    accelerator.backward(share)
                    objective += summed.cpu()
                meter.add(
                    mb.n_targets,
                    train_flops(n_params, int(mb.attention_mask.sum()), trainable=n_trainable),
                )
            norm_before_clip = accelerator.clip_grad_norm_(student.parameters(), config.grad_clip)
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
        mean_reward = float(rewards.mean())
        last = step == config.steps - 1
        if step % config.log_every == 0 or last:
            metrics = {
                "reward": mean_reward,
                "correct": float(np.mean(correct)),
                "well_formed": float(np.mean(formed)),
                "no_signal_groups": float((rewards.std(dim=1) == 0).float().mean()),
                "objective": float(objective) / (norm * accelerator.num_processes),
                "grad_norm": float("nan") if norm_before_clip is None else float(norm_before_clip),
                "lr": lr,
                "fused_loss": float(head.fused),
                "response_len": float(np.mean([len(g.token_ids) for g in gens])),
                "sample_tokens_per_s": n_sampled / max(t_sample, 1e-9),
                "device_hours": ledger.total_device_hours(),
            }
            log(config.output, step + 1, config.steps, metrics)
            if accelerator.is_main_process:
                append_metrics(config.run_dir, {"phase": config.output, "step": step, **metrics})
        if last or (config.eval_every and (step + 1) % config.eval_every == 0):
            stage = "after_rl" if last else f"rl_step_{step + 1}"
            ledger.mark(stage)  # device-hours spent before this measurement
            evals[stage] = measure(
                model, tokenizer, eval_prompts, config.modes, eval_config, ledger
            )
            if accelerator.is_main_process:
                atomic_write_json(evals_path, evals)
                append_metrics(
                    config.run_dir,
                    {
                        "phase": f"{config.output}.eval",
                        "step": step,
                        "device_hours": ledger.total_device_hours(),
                        **evals[stage],
                    },
                )
        if (step + 1) % config.save_every == 0 or last:
            if not accelerator.is_main_process:  # before the barrier: rank 0 merges it after
                ledger.save(config.run_dir / "ledger.json", rank=accelerator.process_index)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {"optimizer": optimizer.state_dict(), "step": step, **adapters.state(model)}
                checkpoint.save(out, adapters.export(model, config.student), tokenizer, state)
                ledger.save(config.run_dir / "ledger.json")
    if owned:
        sampling.close(sampler)
    return Summary(steps=config.steps, final_reward=mean_reward, checkpoint=out, evals=evals)
