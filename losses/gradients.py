"""Each divergence with its gradient with respect to the student's log-probabilities, closed form.

`value_and_grad(kind, log_s, log_t)` returns (D (...), g = ∂D/∂log_s (..., S)). The chunked path
(`losses.fused`) turns g into the gradient on the student's logits without running autograd over
a (chunk, V) graph: for log_s = log_softmax(z), ∂D/∂z = g - p_s · Σ g. The formulas are the
values of `losses.divergences` differentiated by hand; the tests compare both with autograd.

With q = p_s, p = p_t, m the mixture, every g below carries a factor q or p, so zero-mass
entries (-inf, made finite as NEG) get an exact 0.

A caller that already holds q and p (the CPU dense kernel keeps the exponentials of its softmax
pass) passes them as `probs`: no exp is recomputed, and the mixtures' log m is then taken as
log(w a + (1-w) b) of those probabilities, one log per entry instead of logaddexp's exp, log1p
and selects. The two agree to fp32 rounding wherever m is a normal float; below that (both
sides under e^-87) m is clamped to the smallest normal, and every term there is multiplied by
a probability that is itself 0 or subnormal.
"""

import torch

from losses.divergences import Divergence, finite, log_mix

# Smallest normal fp32: the floor of a mixture computed from probabilities before its log.
TINY = torch.finfo(torch.float32).tiny


def _log_mix_probs(a: torch.Tensor, b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b) from probabilities, floored at the smallest normal fp32."""
    return (weight_a * a + (1 - weight_a) * b).clamp(min=TINY).log()


def value_and_grad(
    kind: Divergence,
    log_s: torch.Tensor,
    log_t: torch.Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    probs: tuple[torch.Tensor, torch.Tensor] | None = None,
    sum_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D(p_s, p_t) (...), ∂D/∂log p_s (..., S)) for fp32 log-probabilities on one support.

    probs: (exp(log_s), exp(log_t)) when the caller has them already (see the module notes).
    sum_dtype: accumulate D's sums over the support in this dtype (and return D in it).
    """
    ls, lt = finite(log_s), finite(log_t)

    def total(terms: torch.Tensor) -> torch.Tensor:
        return terms.sum(-1, dtype=sum_dtype)

    def student() -> torch.Tensor:
        return probs[0] if probs is not None else ls.exp()

    def teacher() -> torch.Tensor:
        return probs[1] if probs is not None else lt.exp()

    def mix_log(teacher_weight: float, teacher_first: bool = True) -> torch.Tensor:
        """log m for m = w p_t + (1-w) p_s (teacher_first) or w p_s + (1-w) p_t."""
        if probs is not None:
            a, b = (teacher(), student()) if teacher_first else (student(), teacher())
            return _log_mix_probs(a, b, teacher_weight)
        return log_mix(lt, ls, teacher_weight) if teacher_first else log_mix(ls, lt, teacher_weight)

    # The ends of the families are plain KLs (see losses.divergences.jsd for the convention).
    forward = (
        kind == "forward_kl" or (kind, beta) == ("jsd", 0.0) or (kind, alpha) == ("skew_fkl", 0)
    )
    reverse = (
        kind == "reverse_kl" or (kind, beta) == ("jsd", 1.0) or (kind, alpha) == ("skew_rkl", 0)
    )
    if forward:  # Σ p (lt - ls); ∂/∂ls = -p
        p = teacher()
        return total(p * (lt - ls)), -p
    if reverse:  # Σ q (ls - lt); ∂/∂ls = q (ls - lt) + q
        q = student()
        r = ls - lt
        return total(q * r), q * (r + 1)
    if kind == "jsd":
        # m = β p + (1-β) q; ∂D/∂q = (1-β) log(q/m), the other terms cancel because Σ ∂m = 0
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        lm = mix_log(beta)
        q = student()
        value = beta * total(teacher() * (lt - lm)) + (1 - beta) * total(q * (ls - lm))
        return value, (1 - beta) * q * (ls - lm)
    if kind == "skew_fkl":
        # D = Σ p (lt - lm), m = α p + (1-α) q; ∂D/∂ls = -(1-α) p q / m
        lm = mix_log(alpha)
        value = total(teacher() * (lt - lm))
        return value, -(1 - alpha) * (lt + ls - lm).exp()
    if kind == "skew_rkl":
        # D = Σ q (ls - lm), m = α q + (1-α) p; ∂D/∂ls = q (ls - lm + 1 - α q / m)
        lm = mix_log(alpha, teacher_first=False)
        q = student()
        value = total(q * (ls - lm))
        return value, q * (ls - lm + 1 - alpha * (ls - lm).exp())
    if kind == "tvd":
        # ½ Σ |p - q|; sign(0) = 0 matches autograd's subgradient of abs at 0
        q, p = student(), teacher()
        return 0.5 * total((p - q).abs()), 0.5 * q * torch.sign(q - p)
    raise ValueError(f"unknown divergence {kind!r}")


def logits_grad(g: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """∂D/∂z from g = ∂D/∂log_s when log_s = log_softmax(z) over the same last dim."""
    return g - log_s.exp() * g.sum(-1, keepdim=True)
