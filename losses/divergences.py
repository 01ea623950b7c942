"""Divergences over a common support of log-probabilities, (..., S) -> (...).

All take (log_s, log_t): the student's and the teacher's fp32 log-probabilities on the same
support (see `losses.support`). Entries of -inf are zero probability and contribute nothing.
"""

from collections.abc import Callable
from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_fkl", "skew_rkl", "tvd"]

# -inf (zero mass) is replaced by this before differences are taken, so 0 * log 0 terms are exact
# zeros in value and in gradient instead of NaN.
_NEG = -1e30


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = sum p (log p - log q) over the last dim."""
    log_p, log_q = log_p.clamp(min=_NEG), log_q.clamp(min=_NEG)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b), stably."""
    assert 0.0 < weight_a < 1.0, weight_a
    stacked = torch.stack(
        [log_a + torch.log(torch.tensor(weight_a)), log_b + torch.log(torch.tensor(1 - weight_a))]
    )
    return torch.logsumexp(stacked, dim=0)


def forward_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """KL(p_t‖p_s): mode-covering; the off-policy objective (soft cross-entropy minus H(p_t))."""
    return _kl(log_t, log_s)


def reverse_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """KL(p_s‖p_t): mode-seeking; the usual on-policy objective (GKD, MiniLLM, Qwen3)."""
    return _kl(log_s, log_t)


def jsd(log_s: torch.Tensor, log_t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized JSD(β) = β KL(p_t‖m) + (1-β) KL(p_s‖m), m = β p_t + (1-β) p_s.

    TRL's convention at the ends: β=0 is forward KL(p_t‖p_s), β=1 reverse KL(p_s‖p_t). (The
    formula itself tends to 0 at both ends; the endpoints are the limits of JSD(β)/β and
    JSD(β)/(1-β) up to first order, which is why trainers special-case them.)
    """
    if beta == 0.0:
        return forward_kl(log_s, log_t)
    if beta == 1.0:
        return reverse_kl(log_s, log_t)
    log_m = _log_mix(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def skew_forward_kl(log_s: torch.Tensor, log_t: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p_t‖α p_t + (1-α) p_s); α=0 is forward KL. Bounded by -log α."""
    return _kl(log_t, _log_mix(log_t, log_s, alpha)) if alpha > 0 else forward_kl(log_s, log_t)


def skew_reverse_kl(log_s: torch.Tensor, log_t: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(p_s‖α p_s + (1-α) p_t); α=0 is reverse KL."""
    return _kl(log_s, _log_mix(log_s, log_t, alpha)) if alpha > 0 else reverse_kl(log_s, log_t)


def tvd(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """Total variation ½ Σ|p_t - p_s|: bounded in [0, 1]."""
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_fkl": skew_forward_kl,
    "skew_rkl": skew_reverse_kl,
    "tvd": tvd,
}


def divergence(
    kind: Divergence,
    log_s: torch.Tensor,
    log_t: torch.Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Dispatch by name with the one parameter each divergence takes."""
    if kind == "jsd":
        return jsd(log_s, log_t, beta)
    if kind == "skew_fkl":
        return skew_forward_kl(log_s, log_t, alpha)
    if kind == "skew_rkl":
        return skew_reverse_kl(log_s, log_t, alpha)
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {sorted(DIVERGENCES)}")
    return DIVERGENCES[kind](log_s, log_t)
