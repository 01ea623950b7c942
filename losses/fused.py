"""Chunked fused-linear divergences: from hidden states and lm_head to per-token values and grads.

The student's (N, V) fp32 logits never exist. Rows go through in chunks of C: one matmul in the
inputs' dtype (bf16 in training: fp32 accumulation inside, bf16 out) gives (C, V) logits cut to
the real vocabulary; the divergence and its closed-form logit gradient run in fp32
(`losses.chunk`); two more matmuls turn that into the chunk's hidden-state gradient and its
share of the lm_head gradient. Peak memory is one chunk's buffers plus the (V, H) weight
gradient, whatever N is.

Two entry points, because a per-token output cannot know its upstream gradient in advance:
- `fused_linear_divergence` returns (...,) per-token values like every other loss here; its
  backward recomputes the chunks with the incoming per-token gradient (one extra logit matmul
  per chunk, and the teacher's again for `TeacherHidden`).
- `fused_linear_divergence_sum` takes the loop's per-token weights (mask / target tokens of the
  whole optimizer step) and returns (Σ w·D, per-token values): gradients are computed during the
  forward pass, 3 student matmuls per chunk instead of 4. Use it in training loops.

Teacher data comes in one of four forms (it gets no gradient): `TeacherHidden` (final hidden
states and lm_head: the teacher's logits are never materialised either), `TeacherLogits`,
`TeacherTopK` (ids and log-probs per position, as vLLM returns them; top-k + tail support), and
`TeacherSampled` (the teacher's log-prob of the token the student sampled, for k1/k2/k3).

The lm_head gradient accumulates in the weight's dtype: fp32 weights accumulate in fp32; bf16
weights take one bf16 rounding per chunk (the matmul itself accumulates in fp32), which keeps
the (V, H) buffer at half the size. Padded head rows get a zero gradient.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast, get_args

import torch

from losses.chunk import dense_chunk, sampled_chunk, topk_chunk
from losses.divergences import DIVERGENCES, Divergence
from losses.sampled import ESTIMATORS, Estimator
from losses.support import check_head, topk_teacher_logprobs, valid_ids


@dataclass(frozen=True)
class TeacherHidden:
    """In-process teacher: final hidden states (..., H_t) and lm_head weight (V_t, H_t)."""

    hidden: torch.Tensor
    weight: torch.Tensor


@dataclass(frozen=True)
class TeacherLogits:
    """In-process teacher logits (..., V_t)."""

    logits: torch.Tensor


@dataclass(frozen=True)
class TeacherTopK:
    """Served teacher: top-k ids (..., K) and their log-probs (..., K) per position."""

    ids: torch.Tensor
    logprobs: torch.Tensor


@dataclass(frozen=True)
class TeacherSampled:
    """On-policy: the student's sampled token ids (...) and the teacher's log-prob of each (...)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor


TeacherData = TeacherHidden | TeacherLogits | TeacherTopK | TeacherSampled


@dataclass(frozen=True)
class _Spec:
    kind: Divergence | Estimator
    vocab_size: int
    beta: float
    alpha: float
    chunk_size: int
    compile: bool


ChunkFn = Callable[
    [torch.Tensor, int, int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]
]
F = TypeVar("F", bound=Callable[..., object])
_COMPILED: dict[Callable[..., object], Callable[..., object]] = {}


def _maybe_compiled(fn: F, compile: bool) -> F:
    """fn, or its torch.compile'd twin (built once per process and reused)."""
    if not compile:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return cast(F, _COMPILED[fn])


def _as_divergence(kind: str) -> Divergence:
    for name in get_args(Divergence):
        if kind == name:
            return name
    raise ValueError(f"not a divergence: {kind!r}; choose one of {sorted(DIVERGENCES)}")


def _as_estimator(kind: str) -> Estimator:
    for name in get_args(Estimator):
        if kind == name:
            return name
    raise ValueError(f"sampled-token teacher data takes {ESTIMATORS}, not {kind!r}")


def _flat_teacher(teacher: TeacherData, n: int) -> TeacherData:
    """Teacher tensors with leading dims flattened to N rows, checked against the student's N."""
    if isinstance(teacher, TeacherHidden):
        flat = TeacherHidden(teacher.hidden.reshape(-1, teacher.hidden.shape[-1]), teacher.weight)
        rows = flat.hidden.shape[0]
    elif isinstance(teacher, TeacherLogits):
        flat = TeacherLogits(teacher.logits.reshape(-1, teacher.logits.shape[-1]))
        rows = flat.logits.shape[0]
    elif isinstance(teacher, TeacherTopK):
        k = teacher.ids.shape[-1]
        flat = TeacherTopK(teacher.ids.reshape(-1, k), teacher.logprobs.reshape(-1, k))
        rows = flat.ids.shape[0]
    else:
        flat = TeacherSampled(teacher.token_ids.reshape(-1), teacher.logprobs.reshape(-1))
        rows = flat.token_ids.shape[0]
    if rows != n:
        raise ValueError(f"teacher data has {rows} positions, the student {n}")
    return flat


def _check(teacher: TeacherData, spec: _Spec, student_rows: int) -> None:
    check_head("student", student_rows, spec.vocab_size)
    if isinstance(teacher, TeacherHidden):
        check_head("teacher", teacher.weight.shape[0], spec.vocab_size)
    if isinstance(teacher, TeacherLogits):
        check_head("teacher", teacher.logits.shape[-1], spec.vocab_size)
    if isinstance(teacher, TeacherSampled):
        _as_estimator(spec.kind)
        if bool((teacher.token_ids >= spec.vocab_size).any()):
            raise ValueError(
                f"sampled token id >= vocab_size={spec.vocab_size}: the sampler drew a padded "
                "head row; mask logits beyond the tokenizer's length when sampling"
            )
    else:
        _as_divergence(spec.kind)
    if spec.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {spec.chunk_size}")


def _chunk_fn(teacher: TeacherData, spec: _Spec) -> ChunkFn:
    """(student logits (C, V), start, stop, weight (C,) or None) -> (values, dz) for one form."""
    vocab, beta, alpha = spec.vocab_size, spec.beta, spec.alpha
    if isinstance(teacher, TeacherSampled):
        estimator = _as_estimator(spec.kind)
        present = teacher.token_ids >= 0  # (N,)
        tokens = teacher.token_ids.long().clamp(min=0)  # (N,)
        logprobs = teacher.logprobs.float()  # (N,)
        sampled = _maybe_compiled(sampled_chunk, spec.compile)
        return lambda zs, i, j, w: sampled(
            zs, tokens[i:j], present[i:j], logprobs[i:j], w, estimator
        )
    kind = _as_divergence(spec.kind)
    if isinstance(teacher, TeacherTopK):
        valid, ids = valid_ids(teacher.ids, vocab)  # (N, K) each
        log_t = topk_teacher_logprobs(teacher.logprobs, valid)  # (N, K+1)
        topk = _maybe_compiled(topk_chunk, spec.compile)
        return lambda zs, i, j, w: topk(zs, ids[i:j], valid[i:j], log_t[i:j], w, kind, beta, alpha)
    dense = _maybe_compiled(dense_chunk, spec.compile)
    if isinstance(teacher, TeacherLogits):
        logits = teacher.logits
        return lambda zs, i, j, w: dense(zs, logits[i:j, :vocab], w, kind, beta, alpha)
    hidden, w_teacher = teacher.hidden, teacher.weight[:vocab]  # (N, H_t), (V, H_t)
    # The teacher's (C, V) logits live only inside its chunk, like the student's.
    return lambda zs, i, j, w: dense(zs, hidden[i:j] @ w_teacher.T, w, kind, beta, alpha)


def _chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: TeacherData,
    spec: _Spec,
    token_weight: torch.Tensor | None,
    need_hidden_grad: bool,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(values (N,) fp32, ∂(Σ w·D)/∂hidden (N, H) or None, ∂/∂weight (V_s, H) or None)."""
    vocab = spec.vocab_size
    n = hidden.shape[0]
    w_real = weight[:vocab]  # (V, H): padded rows never enter a softmax
    values = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None  # (N, H)
    grad_weight = torch.zeros_like(weight) if need_weight_grad else None  # (V_s, H)
    if not (need_hidden_grad or need_weight_grad):
        token_weight = None  # values only: skip the gradient math in the kernels
    chunk = _chunk_fn(teacher, spec)
    for start in range(0, n, spec.chunk_size):
        stop = min(start + spec.chunk_size, n)
        h = hidden[start:stop]  # (C, H)
        zs = h @ w_real.T  # (C, V) in the matmul dtype
        w = token_weight[start:stop] if token_weight is not None else None  # (C,)
        value, dz = chunk(zs, start, stop, w)  # (C,), (C, V) or None
        values[start:stop] = value
        if dz is None:
            continue
        if grad_hidden is not None:
            torch.mm(dz, w_real, out=grad_hidden[start:stop])  # (C, H)
        if grad_weight is not None:
            grad_weight[:vocab].addmm_(dz.T, h)  # (V, H) += (V, C) @ (C, H)
    return values, grad_hidden, grad_weight


class _Ctx(torch.autograd.function.FunctionCtx):
    """What our Functions keep on ctx, declared so the type checker sees it."""

    teacher: TeacherData
    spec: _Spec
    saved_tensors: tuple[torch.Tensor, ...]
    needs_input_grad: tuple[bool, ...]


class _PerToken(torch.autograd.Function):
    """Per-token values; backward recomputes each chunk with the incoming gradient."""

    @staticmethod
    def forward(
        ctx: _Ctx, hidden: torch.Tensor, weight: torch.Tensor, teacher: TeacherData, spec: _Spec
    ) -> torch.Tensor:
        values, _, _ = _chunks(hidden, weight, teacher, spec, None, False, False)
        ctx.save_for_backward(hidden, weight)
        ctx.teacher, ctx.spec = teacher, spec
        return values

    @staticmethod
    def backward(
        ctx: _Ctx, *grad_outputs: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        (grad_values,) = grad_outputs  # (N,)
        hidden, weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grads = _chunks(hidden, weight, ctx.teacher, ctx.spec, grad_values.float(), need_h, need_w)
        return grads[1], grads[2], None, None


class _Summed(torch.autograd.Function):
    """Σ w·D with the gradients computed during forward; backward only scales them."""

    @staticmethod
    def forward(
        ctx: _Ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        token_weight: torch.Tensor,
        teacher: TeacherData,
        spec: _Spec,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        values, grad_h, grad_w = _chunks(
            hidden, weight, teacher, spec, token_weight.float(), need_h, need_w
        )
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.spec = spec
        ctx.mark_non_differentiable(values)
        loss = (values * token_weight.float()).sum()  # fp32 scalar
        return loss, values

    @staticmethod
    def backward(
        ctx: _Ctx, *grad_outputs: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        grad_loss = grad_outputs[0]  # scalar; the per-token values are non-differentiable
        saved = iter(ctx.saved_tensors)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = next(saved) if need_h else None
        grad_w = next(saved) if need_w else None
        # The usual upstream gradient is exactly 1 (loss.backward()); skip a (V, H) pass then.
        if not bool(grad_loss == 1.0):
            grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
            grad_w = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None


def _spec(
    kind: Divergence | Estimator,
    vocab_size: int,
    beta: float,
    alpha: float,
    chunk_size: int,
    compile: bool,
) -> _Spec:
    return _Spec(kind, vocab_size, beta, alpha, chunk_size, compile)


def fused_linear_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: TeacherData,
    kind: Divergence | Estimator,
    *,
    vocab_size: int,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int = 256,
    compile: bool = False,
) -> torch.Tensor:
    """Per-token D(student, teacher) (...) from hidden (..., H) and lm_head weight (V_s, H).

    Same values and gradients as `divergence(kind, *dense_support(...))` (or the top-k and
    sampled forms), without (N, V) logits. kind: a divergence for TeacherHidden/Logits/TopK,
    "k1"/"k2"/"k3" for TeacherSampled. compile=True fuses each chunk's fp32 math with
    torch.compile (one compilation per kind and chunk shape; faster on CPU and GPU).
    """
    spec = _spec(kind, vocab_size, beta, alpha, chunk_size, compile)
    _check(teacher, spec, weight.shape[0])
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    values = _PerToken.apply(flat, weight, _flat_teacher(teacher, flat.shape[0]), spec)
    assert isinstance(values, torch.Tensor)
    return values.reshape(hidden.shape[:-1])


def fused_linear_divergence_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: TeacherData,
    kind: Divergence | Estimator,
    token_weight: torch.Tensor,
    *,
    vocab_size: int,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int = 256,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ token_weight · D scalar, per-token D (...) detached), gradients computed in forward.

    token_weight (...) is what the loop would multiply the per-token values by: loss_mask divided
    by the target tokens of the whole optimizer step. Summing these losses over micro-batches
    gives the full-batch gradient.
    """
    spec = _spec(kind, vocab_size, beta, alpha, chunk_size, compile)
    _check(teacher, spec, weight.shape[0])
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    n = flat.shape[0]
    if token_weight.numel() != n:
        raise ValueError(f"token_weight has {token_weight.numel()} entries for {n} positions")
    out = _Summed.apply(flat, weight, token_weight.reshape(n), _flat_teacher(teacher, n), spec)
    assert isinstance(out, tuple)
    loss, values = out
    return loss, values.reshape(hidden.shape[:-1])
