"""Per-step diagnostics of on-policy distillation, from logits the training step already has
(the fused path hands them over chunk by chunk: `accumulate_rows`).

Sums over measured tokens (the caller divides by their count): the reverse KL(p_s‖p_t) on the
teacher's top-k + tail support whatever divergence is trained, the teacher's mass on its own
top-k (how much of the teacher the support sees: near 1 means the coarsened KL is close to the
full one), and the overlap between the student's and the teacher's top-k ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from distill.batch import Batch, Example, next_token_view
from distill.onpolicy.rollout import Rollout
from losses import reverse_kl, topk_support


@dataclass
class Diagnostics:
    """Running sums over the measured tokens of one step."""

    tokens: float = 0.0
    kl: float = 0.0
    teacher_mass: float = 0.0
    overlap: float = 0.0

    def means(self) -> dict[str, float]:
        n = max(self.tokens, 1.0)
        return {
            "kl": self.kl / n,
            "teacher_topk_mass": self.teacher_mass / n,
            "topk_overlap": self.overlap / n,
        }


def measured_mask(
    examples: Sequence[Example], forced: Sequence[np.ndarray], width: int
) -> torch.Tensor:
    """(B, T) bool: response tokens that were sampled (forced ones excluded), loss or not.

    Wider than the loss mask: a truncated response under `--truncation mask` carries no loss
    but is still measured.
    """
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, (e, f) in enumerate(zip(examples, forced, strict=True)):
        P, R = len(e.prompt_ids), len(e.response_ids)
        mask[b, P : P + R] = torch.from_numpy(~np.asarray(f, dtype=bool))
    return mask


@torch.no_grad()
def accumulate(
    diag: Diagnostics, logits: torch.Tensor, batch: Batch, measured: torch.Tensor, vocab_size: int
) -> None:
    """Add one micro-batch: logits (B, T, V_s), measured (B, T) from `measured_mask`."""
    logits, _, _, t_ids, t_lp = next_token_view(logits.detach(), batch)  # (B, T-1, V_s)
    assert t_ids is not None and t_lp is not None
    mask = measured[:, 1:].to(logits.device)  # (B, T-1)
    accumulate_rows(diag, logits, t_ids, t_lp, mask, vocab_size)


@torch.no_grad()
def accumulate_rows(
    diag: Diagnostics,
    logits: torch.Tensor,
    t_ids: torch.Tensor,
    t_lp: torch.Tensor,
    mask: torch.Tensor,
    vocab_size: int,
) -> None:
    """Add rows already aligned: logits (..., V_s) predict the token t_ids/t_lp (..., K) score.

    The fused path calls this once per chunk of its selected rows, (C, V), with mask (C,).
    """
    log_s, log_t = topk_support(logits, t_ids, t_lp, vocab_size)  # (..., K+1)
    kl = reverse_kl(log_s, log_t)  # (...)
    valid = (t_ids >= 0) & (t_ids < vocab_size)  # (..., K)
    mass = torch.where(valid, t_lp.float().exp(), 0.0).sum(-1)  # (...)
    # The teacher's top-k may reach into padded head rows (K up to the head's width); the
    # student's top-k is over the real ids only, so it cannot be wider than the vocabulary.
    K = min(t_ids.shape[-1], vocab_size)
    student_ids = torch.topk(logits[..., :vocab_size].float(), K, dim=-1).indices  # (..., K)
    if vocab_size >= K * K:  # pairwise compare: (..., K, K)
        hits = (student_ids[..., :, None] == t_ids[..., None, :]) & valid[..., None, :]
        overlap = hits.any(-1).float().mean(-1)  # (...)
    else:  # wide K (up to every id): (..., K, K) would be K^2 per row; count ids in (..., V)
        counts = torch.zeros(
            (*t_ids.shape[:-1], vocab_size), dtype=torch.int32, device=t_ids.device
        )
        counts.scatter_add_(-1, t_ids.clamp(0, vocab_size - 1), valid.to(torch.int32))
        overlap = (counts.gather(-1, student_ids) > 0).float().mean(-1)  # (...)
    diag.tokens += float(mask.sum())
    diag.kl += float((kl * mask).sum())
    diag.teacher_mass += float((mass * mask).sum())
    diag.overlap += float((overlap * mask).sum())


@dataclass
class Lengths:
    """Response lengths by mode, and how many hit the limit."""

    by_mode: dict[str, list[int]] = field(default_factory=dict)
    truncated: int = 0
    total: int = 0

    @classmethod
    def of(cls, rollouts: Sequence[Rollout]) -> Lengths:
        """The lengths of a step's rollouts; only the student's own count as truncated."""
        lengths = cls()
        for r in rollouts:
            cut = r.generation.finish_reason == "length" and r.on_policy
            lengths.add(r.mode, len(r.generation.token_ids), cut)
        return lengths

    def add(self, mode: str, length: int, truncated: bool) -> None:
        self.by_mode.setdefault(mode, []).append(length)
        self.truncated += int(truncated)
        self.total += 1

    def means(self) -> dict[str, float]:
        out = {f"response_len_{m}": sum(v) / len(v) for m, v in sorted(self.by_mode.items())}
        out["truncation_rate"] = self.truncated / max(self.total, 1)
        return out
