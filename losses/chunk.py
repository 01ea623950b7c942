"""One chunk of rows of the fused path: per-token values and ∂(Σ w·D)/∂z on the student logits.

Each kernel takes the student's logits for C rows (C, V), already cut to the real vocabulary,
plus those rows' teacher data, and returns the values (C,) fp32. Given a token weight (C,), it
also writes dz (C, V) into `out`, a slice of a buffer the caller allocates once in the gradient
matmuls' dtype: a fresh (C, V) tensor per call would cost page faults on every chunk, and writing
through `out` lets `torch.compile` store the rounded gradient straight from its last pass.
Softmax, divergence and gradient run in fp32; only dz is rounded, because it feeds the bf16
gradient matmuls.

The gradient is closed form (`losses.gradients`), not autograd: autograd over a (C, V) graph
would keep several fp32 (C, V) intermediates alive and run twice the elementwise passes. These
are pure functions, so `torch.compile` can fuse each into a few passes over the chunk.

The dense form's kernel, `dense_chunk`, is one function: on GPUs the compiler fuses it into a
few passes and recomputes each exponential where it is needed, which costs little there. On CPU
the compiled path runs the dense forms in C++ instead (`losses.native`), where the
transcendentals and the passes over memory are what cost.
"""

import torch

from losses.divergences import Divergence, divergence
from losses.gradients import logits_grad, value_and_grad
from losses.sampled import Estimator, estimator_value_and_grad
from losses.support import LOG_TAIL_FLOOR, student_topk_parts


def dense_chunk(
    zs: torch.Tensor,
    zt: torch.Tensor,
    weight: torch.Tensor | None,
    out: torch.Tensor | None,
    kind: Divergence,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """Dense teacher: zs (C, V) student logits, zt (C, V) teacher logits, weight (C,)."""
    log_s = torch.log_softmax(zs.float(), dim=-1)  # (C, V)
    log_t = torch.log_softmax(zt.float(), dim=-1)  # (C, V)
    if weight is None or out is None:
        return divergence(kind, log_s, log_t, beta=beta, alpha=alpha)
    value, g = value_and_grad(kind, log_s, log_t, beta=beta, alpha=alpha)  # (C,), (C, V)
    out.copy_(logits_grad(g, log_s) * weight[:, None])  # (C, V), rounded to out's dtype
    return value


def topk_chunk(
    zs: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor,
    log_t: torch.Tensor,
    weight: torch.Tensor | None,
    out: torch.Tensor | None,
    kind: Divergence,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """Top-k teacher: ids (C, K) clamped, valid (C, K), log_t (C, K+1) the teacher's support."""
    z = zs.float()  # (C, V)
    lse, z_k, lse_tail = student_topk_parts(z, ids, valid)  # (C, 1), (C, K), (C, 1)
    log_s_k = torch.where(valid, z_k - lse, float("-inf"))  # (C, K)
    raw_tail = lse_tail - lse  # (C, 1)
    log_s = torch.cat([log_s_k, raw_tail.clamp(min=LOG_TAIL_FLOOR)], dim=-1)  # (C, K+1)
    if weight is None or out is None:
        return divergence(kind, log_s, log_t, beta=beta, alpha=alpha)
    value, g = value_and_grad(kind, log_s, log_t, beta=beta, alpha=alpha)  # (C,), (C, K+1)
    k = ids.shape[-1]
    # Chain rule back to z. log_s_i = z_id - lse for the K ids; log_s_tail = lse_tail - lse, whose
    # clamp passes no gradient below the floor. With p = softmax(z), for a non-id j:
    # dz_j = p_j (g_tail / p_tail - Σ g), and for id_i: dz = g_i - p_id Σ g.
    live = raw_tail >= LOG_TAIL_FLOOR  # (C, 1)
    g_k = torch.where(valid, g[:, :k], 0.0)  # (C, K)
    g_tail = torch.where(live, g[:, k:], 0.0)  # (C, 1)
    total = g_k.sum(-1, keepdim=True) + g_tail  # (C, 1)
    per_tail = torch.where(live, g_tail * (lse - lse_tail).exp(), 0.0)  # g_tail / p_tail (C, 1)
    dz = (z - lse).exp() * (per_tail - total)  # (C, V), right for every non-id column
    # The K id columns carry no tail term: add g_i - p_id * per_tail there (0 for dropped ids).
    fix = torch.where(valid, g_k - (z_k - lse).exp() * per_tail, 0.0)  # (C, K)
    out.copy_(dz.scatter_add(-1, ids, fix) * weight[:, None])
    return value


def sampled_chunk(
    zs: torch.Tensor,
    tokens: torch.Tensor,
    present: torch.Tensor,
    teacher_logprob: torch.Tensor,
    weight: torch.Tensor | None,
    out: torch.Tensor | None,
    kind: Estimator,
) -> torch.Tensor:
    """Sampled token: tokens (C,) clamped ids, present (C,) bool, teacher_logprob (C,)."""
    z = zs.float()  # (C, V)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (C, 1)
    log_s_x = (z.gather(-1, tokens[:, None]) - lse).squeeze(-1)  # (C,)
    value, g = estimator_value_and_grad(kind, log_s_x, teacher_logprob)  # (C,), (C,)
    value = torch.where(present, value, 0.0)
    if weight is None or out is None:
        return value
    g = torch.where(present, g, 0.0) * weight  # (C,)
    # log p_s(x) = z_x - lse: dz = g (onehot(x) - p)
    dz = -(z - lse).exp() * g[:, None]  # (C, V)
    out.copy_(dz.scatter_add(-1, tokens[:, None], g[:, None]))
    return value
