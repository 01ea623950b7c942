"""Per-token objectives shared by the loops and the evaluations, and the step's normaliser.

The loops own masking and normalisation: a step's loss is sum(per-token loss * mask) divided by
the target tokens of the *whole optimizer step*, across micro-batches and processes. Each
`.backward()` then adds the right share and the summed gradient equals one big batch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from accelerate import Accelerator

from distill.batch import Batch, next_token_view
from losses import Divergence, divergence, topk_support
from students import dtype as dtypes

LogFn = Callable[[str, int, int, Mapping[str, float]], None]  # (phase, step, total, metrics)


def no_log(phase: str, step: int, total: int, metrics: Mapping[str, float]) -> None:
    del phase, step, total, metrics


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """-log p_s(target) over the real vocabulary only (padded head rows get no mass): (B, T)."""
    logp = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)  # (B, T, V)
    return -logp.gather(-1, targets.clamp(max=vocab_size - 1)[..., None]).squeeze(-1)


def topk_divergence(
    logits: torch.Tensor,
    batch: Batch,
    kind: Divergence,
    vocab_size: int,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence (B, T-1), mask (B, T-1)) between student logits and the batch's teacher top-k."""
    logits, _, mask, t_ids, t_lp = next_token_view(logits, batch)
    assert t_ids is not None and t_lp is not None, "this batch carries no teacher top-k"
    log_s, log_t = topk_support(logits, t_ids, t_lp, vocab_size)  # (B, T-1, K+1) each
    per_token = divergence(kind, log_s, log_t, beta=beta, alpha=alpha)  # (B, T-1)
    return per_token.masked_fill(~mask, 0.0), mask


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


Dtype = dtypes.DTypeName  # a trainer's weights and compute: auto, float32, bfloat16, float16


def resolve_dtype(name: str, checkpoint: str | None = None) -> torch.dtype:
    """The student's training dtype: 'auto' is `checkpoint`'s own where the device supports it
    (students/dtype.py), so a bf16 checkpoint trains, and is saved, in bf16; fp32 otherwise."""
    return dtypes.resolve(name, checkpoint)
