"""Divergences over a common support of log-probabilities, (..., S) -> (...).

All take (log_s, log_t): the student's and the teacher's fp32 log-probabilities on the same
support (see `losses.support`). Entries of -inf are zero probability and contribute nothing, in
value and in gradient. `losses.gradients` holds the same formulas with their closed-form
gradients for the chunked path; the tests pin the two to each other.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_fkl", "skew_rkl", "tvd"]
BETA = 0.5  # JSD(β)'s default: 0 is forward KL, 1 reverse KL (TRL's convention)
ALPHA = 0.1  # the skew KLs' default mixing weight


@dataclass(frozen=True)
class DivergenceSpec:
    """One divergence with its parameter, as a loop's Config chose it: the losses' one input.

    Ranges are checked where the Config is built (distill/validation.py).
    """

    kind: Divergence = "reverse_kl"
    beta: float = BETA  # used by jsd only
    alpha: float = ALPHA  # used by skew_fkl and skew_rkl only

    def __call__(self, log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
        """Per-position values (...) on a common support (..., S)."""
        return divergence(self.kind, log_s, log_t, beta=self.beta, alpha=self.alpha)


# -inf (zero mass) is replaced by this before any arithmetic, so 0 * log 0 terms are exact zeros
# in value and in gradient instead of NaN (logsumexp's backward of all -inf is NaN, and 0 * NaN
# stays NaN even where the upstream gradient is 0).
NEG = -1e30


def finite(log_p: torch.Tensor) -> torch.Tensor:
    """log_p with -inf replaced by NEG; exp() of it is still exactly 0."""
    return log_p.clamp(min=NEG)


def at_family_end(kind: Divergence, beta: float, alpha: float) -> Divergence:
    """kind, or the plain KL a family is at its end: JSD β=0 forward, β=1 reverse; skews α=0."""
    if (kind, beta) == ("jsd", 0.0) or (kind, alpha) == ("skew_fkl", 0.0):
        return "forward_kl"
    if (kind, beta) == ("jsd", 1.0) or (kind, alpha) == ("skew_rkl", 0.0):
        return "reverse_kl"
    return kind


def log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b), stably, for finite inputs and 0 < w < 1."""
    if not 0.0 < weight_a < 1.0:
        raise ValueError(f"mixture weight must be in (0, 1), got {weight_a}")
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = sum p (log p - log q) over the last dim; inputs already finite."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """KL(p_t‖p_s): mode-covering; the off-policy objective (soft cross-entropy minus H(p_t))."""
    return _kl(finite(log_t), finite(log_s))


def reverse_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """KL(p_s‖p_t): mode-seeking; the usual on-policy objective (GKD, MiniLLM, Qwen3)."""
    return _kl(finite(log_s), finite(log_t))


def jsd(log_s: torch.Tensor, log_t: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Generalized JSD(β) = β KL(p_t‖m) + (1-β) KL(p_s‖m), m = β p_t + (1-β) p_s.

    TRL's (and Liger's) convention at the ends: β=0 is forward KL(p_t‖p_s), β=1 reverse
    KL(p_s‖p_t). The formula itself tends to 0 at both ends; forward KL is the limit of
    JSD(β)/β as β -> 0 and reverse KL that of JSD(β)/(1-β) as β -> 1, which is why the ends
    are special-cased rather than evaluated. β=0.5 is the symmetric JSD, bounded by ln 2.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(log_s, log_t)
    if beta == 1.0:
        return reverse_kl(log_s, log_t)
    log_s, log_t = finite(log_s), finite(log_t)
    log_m = log_mix(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def skew_forward_kl(log_s: torch.Tensor, log_t: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p_t‖α p_t + (1-α) p_s); α=0 is forward KL. Bounded by -log α."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    if alpha == 0.0:
        return forward_kl(log_s, log_t)
    log_s, log_t = finite(log_s), finite(log_t)
    return _kl(log_t, log_mix(log_t, log_s, alpha))


def skew_reverse_kl(log_s: torch.Tensor, log_t: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(p_s‖α p_s + (1-α) p_t); α=0 is reverse KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    if alpha == 0.0:
        return reverse_kl(log_s, log_t)
    log_s, log_t = finite(log_s), finite(log_t)
    return _kl(log_s, log_mix(log_s, log_t, alpha))


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
    beta: float = BETA,
    alpha: float = ALPHA,
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
