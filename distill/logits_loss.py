"""Per-token losses from full (B, T, V) logits: the reference path, and the evaluations' path.

`distill/fused_loss.py` computes the same values and gradients from hidden states in chunks;
the tests pin each fused loss to its twin here. Both return per-token values (or their sums):
masking and normalisation belong to the loop (distill/loop.py).
"""

from __future__ import annotations

import torch

from distill.batch import Batch, next_token_view
from losses import DivergenceSpec, topk_support


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """-log p_s(target) over the real vocabulary only (padded head rows get no mass): (B, T)."""
    logp = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)  # (B, T, V)
    return -logp.gather(-1, targets.clamp(max=vocab_size - 1)[..., None]).squeeze(-1)


def topk_divergence(
    logits: torch.Tensor, batch: Batch, divergence: DivergenceSpec, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence (B, T-1), mask (B, T-1)) between student logits and the batch's teacher top-k."""
    logits, _, mask, t_ids, t_lp = next_token_view(logits, batch)
    assert t_ids is not None and t_lp is not None, "this batch carries no teacher top-k"
    log_s, log_t = topk_support(logits, t_ids, t_lp, vocab_size)  # (B, T-1, K+1) each
    per_token = divergence(log_s, log_t)  # (B, T-1)
    return per_token.masked_fill(~mask, 0.0), mask
