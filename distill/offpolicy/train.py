"""Off-policy distillation: fine-tune the student on the teacher's kept responses.

    distill offpolicy --run-dir runs/demo --student PATH

The loss is cross-entropy on response tokens (the thinking included in thinking mode; forced
budget-sentence tokens are context, never targets: the student should not learn to give up), plus,
when the data stores the teacher's top-k, `kd_weight` x a divergence to it (logit-level KD).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import checkpoint
from distill.accounting import GpuLedger, train_flops
from distill.batch import Example, collate, length_buckets, next_token_view
from distill.errors import DistillError
from distill.objective import (
    LogFn,
    cross_entropy,
    global_target_tokens,
    lr_at,
    no_log,
    resolve_dtype,
    set_lr,
    topk_divergence,
)
from distill.offpolicy.generate import read_rows
from distill.rundir import append_metrics
from losses import Divergence
from teachers.protocol import TopK


@dataclass(frozen=True, kw_only=True)
class Config:
    run_dir: Path
    student: str  # a from_pretrained folder (or hub id where the network allows)
    data_dir: Path | None = None  # default: RUN_DIR/teacher_data
    output: str = "offpolicy"  # sub-folder of run_dir for checkpoints
    steps: int = 100
    batch_size: int = 16  # sequences per optimizer step (all processes)
    micro_batch_size: int = 8  # sequences per forward/backward
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kd_weight: float = 0.0  # > 0 needs data generated with --store-topk
    kd_divergence: Divergence = "forward_kl"
    dtype: str = "auto"
    log_every: int = 10
    save_every: int = 50
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class Summary:
    steps: int
    final_loss: float
    checkpoint: Path
    examples: int


def load_examples(data_dir: Path, with_topk: bool) -> list[Example]:
    rows = read_rows(data_dir)
    kept = [r for r in rows if r["verdict"] == "kept"]
    if not kept:
        by = {}
        for r in rows:
            by[str(r["verdict"])] = by.get(str(r["verdict"]), 0) + 1
        raise DistillError(
            f"no usable teacher responses in {data_dir}: all {len(rows)} were filtered out "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(by.items()))}); raise --max-tokens, "
            "use a stronger teacher, or relax the filters"
        )
    if with_topk and "topk_ids" not in kept[0]:
        raise DistillError(
            "--kd-weight > 0 needs the teacher's top-k in the data: regenerate with --store-topk K"
        )
    examples = []
    for r in kept:
        response = list(r["response_ids"])  # type: ignore[arg-type]
        topk = None
        if with_topk:
            ids = np.asarray(r["topk_ids"], dtype=np.int32)
            lp = np.asarray(r["topk_logprobs"], dtype=np.float32)
            topk = TopK(ids=ids, logprobs=lp, actual_logprobs=np.zeros(len(response), np.float32))
        examples.append(
            Example(
                prompt_ids=list(r["prompt_ids"]),  # type: ignore[arg-type]
                response_ids=response,
                train=~np.asarray(r["forced"], dtype=bool),
                topk=topk,
            )
        )
    return examples


def train(config: Config, ledger: GpuLedger, log: LogFn = no_log) -> Summary:
    """Fine-tune `config.student` on kept teacher responses; resumes from its last checkpoint."""
    assert config.batch_size % config.micro_batch_size == 0, "batch_size % micro_batch_size"
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    out = config.run_dir / config.output / "checkpoint"
    resume = checkpoint.latest(out)
    source = str(resume) if resume else config.student
    tokenizer = AutoTokenizer.from_pretrained(source)
    student = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(config.dtype))
    vocab_size = len(tokenizer)
    n_params = sum(p.numel() for p in student.parameters())
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95)
    )
    start = 0
    if resume:
        state = checkpoint.load_state(resume)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"]) + 1
    student, optimizer = accelerator.prepare(student, optimizer)
    student.train()

    examples = load_examples(
        config.data_dir or config.run_dir / "teacher_data", config.kd_weight > 0
    )
    epoch_steps = max(1, len(examples) // config.batch_size)
    order: list[list[int]] = []  # the current epoch's batches, rebuilt from (seed, epoch)
    loss_sum = torch.zeros(())
    loss = float("nan")
    for step in range(start, config.steps):
        epoch = step // epoch_steps
        if not order or step == start or step % epoch_steps == 0:
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            order = length_buckets([len(e) for e in examples], config.batch_size, g)
        chosen = [examples[i] for i in order[step % epoch_steps]]
        mine = chosen[accelerator.process_index :: accelerator.num_processes]
        micro = [
            collate(mine[i : i + config.micro_batch_size], pad_id=int(tokenizer.pad_token_id))
            for i in range(0, len(mine), config.micro_batch_size)
        ]
        n_tokens = global_target_tokens(micro, accelerator)
        with ledger.phase("student.train", devices=accelerator.num_processes) as meter:
            for i, mb in enumerate(micro):
                mb = mb.to(accelerator.device)
                last = i == len(micro) - 1
                with nullcontext() if last else accelerator.no_sync(student):
                    logits = student(
                        input_ids=mb.input_ids, attention_mask=mb.attention_mask
                    ).logits  # (B, T, V)
                    shifted, targets, mask, _, _ = next_token_view(logits, mb)
                    per_token = cross_entropy(shifted, targets, vocab_size) * mask  # (B, T-1)
                    if config.kd_weight > 0:
                        kd, _ = topk_divergence(logits, mb, config.kd_divergence, vocab_size)
                        per_token = per_token + config.kd_weight * kd
                    accelerator.backward(per_token.sum() / n_tokens)
                    loss_sum += per_token.detach().sum().cpu()
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
        loss = float(loss_sum) / (n_tokens * accelerator.num_processes)
        loss_sum.zero_()
        if step % config.log_every == 0 or step == config.steps - 1:
            metrics = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": n_tokens}
            log(config.output, step + 1, config.steps, metrics)
            if accelerator.is_main_process:
                append_metrics(config.run_dir, {"phase": config.output, "step": step, **metrics})
        if (step + 1) % config.save_every == 0 or step == config.steps - 1:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {"optimizer": optimizer.state_dict(), "step": step}
                checkpoint.save(out, accelerator.unwrap_model(student), tokenizer, state)
                ledger.save(config.run_dir / "ledger.json")
    return Summary(steps=config.steps, final_loss=loss, checkpoint=out, examples=len(examples))
