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

The dense form has two kernels. `dense_chunk` is one function, for GPUs: the compiler fuses it
into a few passes and recomputes each exponential where it is needed, which costs little there.
On CPU the transcendentals are the cost (a fused JSD row takes seven per entry: exp and the sum
per softmax, then exp, exp, exp and log1p for q, p and logaddexp's log m, then exp again for
dz), so the CPU splits it in two: `dense_exps` keeps each side's exp(z - max) in an fp32
scratch row block, and `dense_chunk_from_exps` reads q and p from there, leaving one log per
entry (log m) for JSD and the skews and none for the KLs. Measured on 2 cores, 256 rows of
V = 151,936: JSD 67 -> 44 ms, forward KL 32 -> 27 ms.
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


def _sum64(x: torch.Tensor) -> torch.Tensor:
    """Row sums (R, 1) accumulated in fp64.

    Inductor's CPU reductions add each vector lane's terms one after another (thousands per
    lane for a 151,936-wide row); in fp32 the small terms lose their low bits, always downward.
    Measured on the benchmark's JSD: the sums of exponentials came out 2.7e-6 low (relative)
    and the mean loss 8.4e-6 high; with fp64 accumulators for those sums and for the loss's own
    sums, 6.8e-8. Eager PyTorch's reductions cascade more and were already close (1.8e-8).
    """
    return x.sum(-1, keepdim=True, dtype=torch.float64)


def dense_exps(
    zs: torch.Tensor, zt: torch.Tensor, exp_s: torch.Tensor, exp_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax pass of the CPU dense kernel over R rows (R, V) of each side's logits.

    Writes exp(z - max z) into exp_s and exp_t, fp32 (R, V) scratch; returns each side's log
    normaliser (R, 1), logsumexp z, and the reciprocal of its sum of exponentials (R, 1).
    """
    a, b = zs.float(), zt.float()  # (R, V)
    max_s, max_t = a.amax(-1, keepdim=True), b.amax(-1, keepdim=True)  # (R, 1)
    e_s, e_t = (a - max_s).exp(), (b - max_t).exp()  # (R, V)
    exp_s.copy_(e_s)
    exp_t.copy_(e_t)
    sum_s, sum_t = _sum64(e_s), _sum64(e_t)  # (R, 1) fp64
    lse_s, lse_t = max_s.double() + sum_s.log(), max_t.double() + sum_t.log()  # (R, 1)
    return lse_s.float(), lse_t.float(), (1 / sum_s).float(), (1 / sum_t).float()


def dense_chunk_from_exps(
    zs: torch.Tensor,
    zt: torch.Tensor,
    exp_s: torch.Tensor,
    exp_t: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    inv_sum_s: torch.Tensor,
    inv_sum_t: torch.Tensor,
    weight: torch.Tensor | None,
    out: torch.Tensor | None,
    kind: Divergence,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """`dense_chunk` from `dense_exps`' outputs: q = exp_s / Σ, p = exp_t / Σ, never exp'd again."""
    log_s, log_t = zs.float() - lse_s, zt.float() - lse_t  # (R, V)
    q, p = exp_s * inv_sum_s, exp_t * inv_sum_t  # (R, V)
    value, g = value_and_grad(
        kind, log_s, log_t, beta=beta, alpha=alpha, probs=(q, p), sum_dtype=torch.float64
    )  # g is dropped by the compiler when no dz is asked for
    if weight is not None and out is not None:
        # Σ g stays fp32: it only scales dz, which is rounded to bf16 for the gradient matmuls.
        out.copy_((g - q * g.sum(-1, keepdim=True)) * weight[:, None])  # logits_grad, q known
    return value.float()


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
