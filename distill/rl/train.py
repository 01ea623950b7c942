"""The RL baseline: GRPO with a verifiable reward, on the same student and prompts as distillation.

    distill rl --run-dir runs/rl --student runs/default/offpolicy/checkpoint

Each step the student samples G responses to each prompt with the same HF sampler on-policy
distillation uses, a checker scores them (answer correctness, optional format bonus), and the
student follows the policy gradient of its own tokens weighted by group-relative advantages.
One update per batch of samples, so the policy that sampled is the policy that is updated: the
PPO ratio is exactly 1 and needs no clipping or old-policy forward. No reference-model KL term
(as DAPO and Dr. GRPO): the comparison with distillation is then RL's own cheapest form.

Every phase goes through the run's GpuLedger, student.sample / student.train / eval, so the RL
device-hours and the distillation device-hours come from one meter (docs/accounting.md says why
this loop and not TRL's GRPOTrainer).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from distill import checkpoint, evaluate
from distill.accounting import GpuLedger, forward_flops, matmul_params, train_flops
from distill.batch import Example, collate, next_token_view
from distill.errors import DistillError
from distill.objective import LogFn, cross_entropy, lr_at, no_log, resolve_dtype, set_lr
from distill.offpolicy.filters import verify
from distill.prompts import Prompt
from distill.rl.reward import group_advantages, well_formed
from distill.rundir import append_metrics, atomic_write_json, read_json
from students.sample import HFSampler
from teachers.chat import MODES, Mode, render_prompt
from teachers.protocol import (
    NON_THINKING_SAMPLING,
    THINKING_SAMPLING,
    Generation,
    SamplingParams,
)


@dataclass(frozen=True, kw_only=True)
class Config:
    run_dir: Path
    student: str  # usually the off-policy checkpoint, the starting point of on-policy too
    output: str = "rl"
    steps: int = 50
    prompts_per_step: int = 4
    samples_per_prompt: int = 8  # G: the group each advantage is relative to
    micro_batch_size: int = 16
    modes: tuple[Mode, ...] = MODES
    think_ratio: float = 0.5  # share of prompts in thinking mode when both modes are on
    max_tokens: int = 256
    format_weight: float = 0.0  # reward for a well-formed response, on top of correctness
    scale_by_std: bool = True  # GRPO; False: Dr. GRPO (centred rewards only)
    lr: float = 5e-5  # by its own objective: 2e-4 left the mean reward flat and drifted the policy
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "auto"
    log_every: int = 5
    save_every: int = 25
    eval_every: int = 0  # 0: evaluate before the first step and after the last only
    seed: int = 0
    think_sampling: SamplingParams = THINKING_SAMPLING
    no_think_sampling: SamplingParams = NON_THINKING_SAMPLING


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


def train(
    config: Config,
    prompts: Sequence[Prompt],
    eval_prompts: Sequence[Prompt],
    eval_config: evaluate.Config,
    ledger: GpuLedger,
    log: LogFn = no_log,
) -> Summary:
    """Sample G per prompt -> reward -> group-relative advantages -> policy gradient; resumable."""
    if any(p.answer is None for p in prompts):
        raise DistillError(
            "RL needs a reference answer for every training prompt (the reward checks it): "
            "pass --answer-column naming the answers, or filter out prompts without one"
        )
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if config.prompts_per_step % accelerator.num_processes:
        raise DistillError(
            f"--prompts-per-step {config.prompts_per_step} does not split evenly over "
            f"{accelerator.num_processes} processes: use a multiple of the process count"
        )
    out = config.run_dir / config.output / "checkpoint"
    resume = checkpoint.latest(out)
    source = str(resume) if resume else config.student
    tokenizer = AutoTokenizer.from_pretrained(source)
    dtype = resolve_dtype(config.dtype, config.student)
    student = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    pad_id, vocab_size = int(tokenizer.pad_token_id), len(tokenizer)
    n_params = matmul_params(student)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.95)
    )
    start = 0
    if resume:
        state = checkpoint.load_state(resume)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"]) + 1
    student, optimizer = accelerator.prepare(student, optimizer)
    student.train()
    model = accelerator.unwrap_model(student)
    sampler = HFSampler(
        model, eos_id=int(tokenizer.eos_token_id), pad_id=pad_id, vocab_size=vocab_size
    )
    G = config.samples_per_prompt
    evals_path = config.run_dir / "eval.json"
    evals: dict[str, dict[str, float]] = read_json(evals_path) if evals_path.exists() else {}
    mean_reward = float("nan")
    for step in range(start, config.steps):
        if step == 0 and "before" not in evals:
            ledger.mark("before")
            evals["before"] = measure(
                model, tokenizer, eval_prompts, config.modes, eval_config, ledger
            )
            if accelerator.is_main_process:
                atomic_write_json(evals_path, evals)
        chosen = step_prompts(config, prompts, step)
        mine = chosen[accelerator.process_index :: accelerator.num_processes]
        # G copies of each prompt, contiguous: row p * G + g is sample g of prompt p
        prompt_ids = [
            render_prompt(tokenizer, p.messages, mode) for p, mode in mine for _ in range(G)
        ]
        modes: list[Mode] = [mode for _, mode in mine for _ in range(G)]
        sampled: dict[int, Generation] = {}
        with ledger.phase("student.sample", devices=accelerator.num_processes) as meter:
            for mode in MODES:  # one call per mode: each has its own sampling preset
                idx = [i for i, m in enumerate(modes) if m == mode]
                if not idx:
                    continue
                base = config.think_sampling if mode == "think" else config.no_think_sampling
                params = replace(
                    base,
                    max_tokens=config.max_tokens,
                    seed=config.seed * 1_000_003 + step * 2 + (mode == "think"),
                )
                for i, g in zip(
                    idx, sampler.generate([prompt_ids[i] for i in idx], params), strict=True
                ):
                    sampled[i] = g
            gens = [sampled[i] for i in range(len(prompt_ids))]
            n_sampled = sum(len(g.token_ids) for g in gens)
            meter.add(n_sampled, forward_flops(n_params, n_sampled))
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
        n_tokens = torch.tensor(float(sum(int(e.train.sum()) for e in examples)))
        total_tokens = accelerator.reduce(n_tokens.to(accelerator.device), reduction="sum")
        assert isinstance(total_tokens, torch.Tensor)
        # DDP averages gradients over processes: divide by (global tokens / world size)
        norm = max(float(total_tokens), 1.0) / accelerator.num_processes
        objective = torch.zeros(())
        with ledger.phase("student.train", devices=accelerator.num_processes) as meter:
            chunks = range(0, len(examples), config.micro_batch_size)
            for j, s in enumerate(chunks):
                mb = collate(examples[s : s + config.micro_batch_size], pad_id).to(
                    accelerator.device
                )
                adv = advantages[s : s + config.micro_batch_size].to(accelerator.device)  # (B,)
                with nullcontext() if j == len(chunks) - 1 else accelerator.no_sync(student):
                    logits = student(
                        input_ids=mb.input_ids, attention_mask=mb.attention_mask
                    ).logits  # (B, T, V)
                    logits, targets, mask, _, _ = next_token_view(
                        logits, mb
                    )  # (B, T-1, V), (B, T-1)
                    neg_logp = cross_entropy(logits, targets, vocab_size)  # (B, T-1): -log π(y_t)
                    # ∇ of Σ_t A·(-log π) is minus the policy gradient: descending it raises the
                    # log-probability of tokens in better-than-average responses
                    per_token = (adv[:, None] * neg_logp).masked_fill(~mask, 0.0)  # (B, T-1)
                    accelerator.backward(per_token.sum() / norm)
                    objective += per_token.detach().sum().cpu()
                meter.add(mb.n_targets, train_flops(n_params, int(mb.attention_mask.sum())))
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
                "response_len": float(np.mean([len(g.token_ids) for g in gens])),
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
                state = {"optimizer": optimizer.state_dict(), "step": step}
                checkpoint.save(out, model, tokenizer, state)
                ledger.save(config.run_dir / "ledger.json")
    return Summary(steps=config.steps, final_reward=mean_reward, checkpoint=out, evals=evals)
