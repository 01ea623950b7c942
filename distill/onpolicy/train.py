"""On-policy distillation: the student samples, the teacher scores those tokens, the student
minimises a divergence to the teacher at every position it produced.

    distill onpolicy --run-dir runs/demo

Default divergence: reverse KL(p_s‖p_t) on the teacher's top-k + tail support. It is the
divergence of the student's own samples (mode-seeking: the student is pushed off tokens the
teacher finds unlikely instead of spreading mass to cover every teacher mode), which is what the
Qwen3 report, GKD and MiniLLM use on-policy; on the coarsened support it is exact, never negative.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import checkpoint
from distill.accounting import GpuLedger, forward_flops, train_flops
from distill.batch import Example, collate
from distill.objective import (
    LogFn,
    global_target_tokens,
    lr_at,
    no_log,
    resolve_dtype,
    set_lr,
    topk_divergence,
)
from distill.prompts import Prompt
from distill.rundir import append_metrics
from losses import Divergence
from students.sample import HFSampler
from teachers.chat import MODES, Mode, render_prompt
from teachers.protocol import NON_THINKING_SAMPLING, THINKING_SAMPLING, SamplingParams, Teacher


@dataclass(frozen=True, kw_only=True)
class Config:
    run_dir: Path
    student: str  # usually RUN_DIR/offpolicy/checkpoint
    output: str = "onpolicy"
    steps: int = 50
    prompts_per_step: int = 8
    samples_per_prompt: int = 2  # G
    micro_batch_size: int = 8
    modes: tuple[Mode, ...] = MODES
    think_ratio: float = 0.5  # share of prompts in thinking mode when both modes are on
    max_tokens: int = 256
    top_k: int = 16  # teacher log-probs per position (vLLM server: <= --max-logprobs)
    divergence: Divergence = "reverse_kl"
    beta: float = 0.5  # JSD(β)
    alpha: float = 0.1  # skew KL
    truncation: str = "mask"  # responses that hit max_tokens: "mask" (no loss), "drop", "keep"
    lr: float = 5e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "auto"
    log_every: int = 5
    save_every: int = 25
    seed: int = 0
    think_sampling: SamplingParams = THINKING_SAMPLING
    no_think_sampling: SamplingParams = NON_THINKING_SAMPLING


@dataclass(frozen=True, kw_only=True)
class Summary:
    steps: int
    final_loss: float
    checkpoint: Path


def step_prompts(config: Config, prompts: list[Prompt], step: int) -> list[tuple[Prompt, Mode]]:
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


def train(
    config: Config,
    teacher: Teacher,
    prompts: list[Prompt],
    ledger: GpuLedger,
    log: LogFn = no_log,
) -> Summary:
    """Student samples -> teacher scores -> student minimises the divergence; resumable."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    out = config.run_dir / config.output / "checkpoint"
    resume = checkpoint.latest(out)
    source = str(resume) if resume else config.student
    tokenizer = AutoTokenizer.from_pretrained(source)
    student = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(config.dtype))
    vocab_size = len(tokenizer)
    n_params = sum(p.numel() for p in student.parameters())
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
    sampler = HFSampler(
        accelerator.unwrap_model(student),
        eos_id=int(tokenizer.eos_token_id),
        pad_id=int(tokenizer.pad_token_id),
        vocab_size=vocab_size,
    )
    loss = float("nan")
    for step in range(start, config.steps):
        chosen = step_prompts(config, prompts, step)
        mine = chosen[accelerator.process_index :: accelerator.num_processes]
        prompt_ids, modes = [], []
        for p, mode in mine:
            for _ in range(config.samples_per_prompt):
                prompt_ids.append(render_prompt(tokenizer, p.messages, mode))
                modes.append(mode)
        gens = []
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
                    gens.append((i, g))
            gens = [g for _, g in sorted(gens, key=lambda x: x[0])]
            n_sampled = sum(len(g.token_ids) for g in gens)
            meter.add(n_sampled, forward_flops(n_params, n_sampled))
        truncated = [g.finish_reason == "length" for g in gens]
        keep = [i for i in range(len(gens)) if not (truncated[i] and config.truncation == "drop")]
        with ledger.phase("teacher.score") as meter:
            seqs = [prompt_ids[i] + gens[i].token_ids.tolist() for i in keep]
            scores = teacher.score(seqs, [len(prompt_ids[i]) for i in keep], config.top_k)
            meter.add(sum(len(s) for s in seqs))
        examples = [
            Example(
                prompt_ids=prompt_ids[i],
                response_ids=gens[i].token_ids.tolist(),
                # forced tokens were not sampled by the student; truncated ones may be masked
                train=~gens[i].forced
                & ~np.full(len(gens[i].token_ids), truncated[i] and config.truncation == "mask"),
                topk=s,
            )
            for i, s in zip(keep, scores, strict=True)
        ]
        micro = [
            collate(examples[i : i + config.micro_batch_size], pad_id=int(tokenizer.pad_token_id))
            for i in range(0, len(examples), config.micro_batch_size)
        ]
        n_tokens = global_target_tokens(micro, accelerator)
        total = torch.zeros(())
        with ledger.phase("student.train", devices=accelerator.num_processes) as meter:
            for i, mb in enumerate(micro):
                mb = mb.to(accelerator.device)
                with nullcontext() if i == len(micro) - 1 else accelerator.no_sync(student):
                    logits = student(
                        input_ids=mb.input_ids, attention_mask=mb.attention_mask
                    ).logits  # (B, T, V)
                    per_token, _ = topk_divergence(
                        logits,
                        mb,
                        config.divergence,
                        vocab_size,
                        beta=config.beta,
                        alpha=config.alpha,
                    )  # (B, T-1)
                    accelerator.backward(per_token.sum() / n_tokens)
                    total += per_token.detach().sum().cpu()
                meter.add(mb.n_targets, train_flops(n_params, int(mb.attention_mask.sum())))
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
        loss = float(total) / (n_tokens * accelerator.num_processes)
        if step % config.log_every == 0 or step == config.steps - 1:
            metrics = {
                "loss": loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "truncation_rate": float(np.mean(truncated)),
                "response_len": float(np.mean([len(g.token_ids) for g in gens])),
            }
            log(config.output, step + 1, config.steps, metrics)
            if accelerator.is_main_process:
                append_metrics(config.run_dir, {"phase": config.output, "step": step, **metrics})
        if (step + 1) % config.save_every == 0 or step == config.steps - 1:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {"optimizer": optimizer.state_dict(), "step": step}
                checkpoint.save(out, accelerator.unwrap_model(student), tokenizer, state)
                ledger.save(config.run_dir / "ledger.json")
    return Summary(steps=config.steps, final_loss=loss, checkpoint=out)
