"""Each divergence with its gradient with respect to the student's log-probabilities, closed form.

`value_and_grad(kind, log_s, log_t)` returns (D (...), g = ∂D/∂log_s (..., S)). The chunked path
(`losses.fused`) turns g into the gradient on the student's logits without running autograd over
a (chunk, V) graph: for log_s = log_softmax(z), ∂D/∂z = g - p_s · Σ g. The formulas are the
values of `losses.divergences` differentiated by hand; the tests compare both with autograd.

With q = p_s, p = p_t, m the mixture, every g below carries a factor q or p, so zero-mass
entries (-inf, made finite as NEG) get an exact 0.

The CPU's C++ kernel (`losses/dense_cpu.cpp`) computes the same values and gradients from the
probabilities and log-ratios it holds; tests/test_losses_native.py pins it to these.
"""

import torch

from losses.divergences import ALPHA, BETA, Divergence, at_family_end, finite, log_mix


def value_and_grad(
    kind: Divergence,
    log_s: torch.Tensor,
    log_t: torch.Tensor,
    *,
    beta: float = BETA,
    alpha: float = ALPHA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D(p_s, p_t) (...), ∂D/∂log p_s (..., S)) for fp32 log-probabilities on one support."""
    ls, lt = finite(log_s), finite(log_t)
    # The ends of the families are plain KLs (see losses.divergences.jsd for the convention).
    kind = at_family_end(kind, beta, alpha)
    if kind == "forward_kl":  # Σ p (lt - ls); ∂/∂ls = -p
        p = lt.exp()
        return (p * (lt - ls)).sum(-1), -p
    if kind == "reverse_kl":  # Σ q (ls - lt); ∂/∂ls = q (ls - lt) + q
        q = ls.exp()
        r = ls - lt
        return (q * r).sum(-1), q * (r + 1)
    if kind == "jsd":
        # m = β p + (1-β) q; ∂D/∂q = (1-β) log(q/m), the other terms cancel because Σ ∂m = 0
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        lm = log_mix(lt, ls, beta)
        q = ls.exp()
        value = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (q * (ls - lm)).sum(-1)
        return value, (1 - beta) * q * (ls - lm)
    if kind == "skew_fkl":
        # D = Σ p (lt - lm), m = α p + (1-α) q; ∂D/∂ls = -(1-α) p q / m
        lm = log_mix(lt, ls, alpha)
        value = (lt.exp() * (lt - lm)).sum(-1)
        return value, -(1 - alpha) * (lt + ls - lm).exp()
    if kind == "skew_rkl":
        # D = Σ q (ls - lm), m = α q + (1-α) p; ∂D/∂ls = q (ls - lm + 1 - α q / m)
        lm = log_mix(ls, lt, alpha)
        q = ls.exp()
        value = (q * (ls - lm)).sum(-1)
        return value, q * (ls - lm + 1 - alpha * (ls - lm).exp())
    if kind == "tvd":
        # ½ Σ |p - q|; sign(0) = 0 matches autograd's subgradient of abs at 0
        q, p = ls.exp(), lt.exp()
        return 0.5 * (p - q).abs().sum(-1), 0.5 * q * torch.sign(q - p)
    raise ValueError(f"unknown divergence {kind!r}")


def logits_grad(g: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """∂D/∂z from g = ∂D/∂log_s when log_s = log_softmax(z) over the same last dim."""
    return g - log_s.exp() * g.sum(-1, keepdim=True)
