"""Chunked fused-linear divergences: from hidden states and lm_head to per-token values and grads.

The student's (N, V) fp32 logits never exist. Rows go through in chunks of C: one matmul gives
(C, V) logits cut to the real vocabulary (bf16 inputs: fp32 accumulation inside; the logits come
out in fp32 where a bf16-in/fp32-out matmul exists, CUDA and CPUs with AMX, and in bf16 elsewhere
unless `exact_logits` asks for a second, residual matmul: `losses.logits`); the divergence and its
closed-form logit gradient run in fp32 (`losses.chunk`, on CPU in blocks of rows that stay in
cache; compiled on CPU, the dense forms run a C++ kernel instead, `losses.native`); two more
matmuls turn that into the chunk's hidden-state gradient and its share of the lm_head gradient. Peak
memory is three (C, V) buffers, made once per call or kept in a `losses.workspace.Workspace`, plus
the (V, H) weight gradient, whatever N is.

Two entry points, because a per-token output cannot know its upstream gradient in advance:
- `fused_linear_divergence` returns (...,) per-token values like every other loss here; its
  backward recomputes the chunks with the incoming per-token gradient (one extra logit matmul
  per chunk, and the teacher's again for `TeacherHidden`).
- `fused_linear_divergence_sum` takes the loop's per-token weights (mask / target tokens of the
  whole optimizer step) and returns (Σ w·D, per-token values): gradients are computed during the
  forward pass, 3 student matmuls per chunk instead of 4. Use it in training loops.

Teacher data: `losses.teacher_data` (hidden + lm_head, logits, top-k, sampled token).

The lm_head gradient accumulates in the weight's dtype: fp32 weights accumulate in fp32; bf16
weights take one bf16 rounding per chunk (the matmul itself accumulates in fp32), which keeps
the (V, H) buffer at half the size. Padded head rows get a zero gradient.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast, get_args

import torch

from losses import native
from losses.chunk import dense_chunk, sampled_chunk, topk_chunk
from losses.divergences import ALPHA, BETA, DIVERGENCES, Divergence
from losses.logits import fp32_out_matmul, logits_into, matmul_out_dtype
from losses.sampled import ESTIMATORS, Estimator
from losses.support import check_head, topk_teacher_logprobs, valid_ids
from losses.teacher_data import (
    TeacherData,
    TeacherHidden,
    TeacherLogits,
    TeacherSampled,
    TeacherTopK,
    flat_teacher,
)
from losses.workspace import Workspace, buffer


@dataclass(frozen=True)
class _Spec:
    kind: Divergence | Estimator
    vocab_size: int
    beta: float
    alpha: float
    chunk_size: int
    compile: bool
    exact_logits: bool


# (student logits (R, V), teacher logits (R, V) or None, first row, end row, token weight (R,) or
# None, dz out (R, V) or None) -> values (R,): one form's kernel over a block of rows.
ChunkFn = Callable[
    [torch.Tensor, torch.Tensor | None, int, int, torch.Tensor | None, torch.Tensor | None],
    torch.Tensor,
]
# (student logits (C, V) of rows [start, stop), start, stop) -> None: sees each chunk's logits
# before the buffer is reused, e.g. for diagnostics (no grad; must not keep or modify them).
Observer = Callable[[torch.Tensor, int, int], None]
F = TypeVar("F", bound=Callable[..., object])
_COMPILED: dict[Callable[..., object], Callable[..., object]] = {}

# Rows per chunk: its (C, V) buffers are the loss's memory (fp32 logits per side and the bf16
# logit gradient: 10 bytes per row per vocabulary entry, 0.78 GB at V = 151,936), and its logit
# matmuls grow more efficient with C. On 2 CPU cores (JSD, N = 2,048, bf16 inputs, fp32 logits
# from MKL) a step took 4.43 s at C = 128, 3.17 s at 256, 2.63 s at 512, 2.50 s at 1,024.
CHUNK_ROWS = 512

# Rows per elementwise call on CPU (top-k, sampled, and eager dense forms). A chunk's (C, V)
# logits come from one matmul (a big C keeps it efficient), but its fp32 math makes several passes
# over each row (max, sum-exp, value, dz): as one (256, V) call every pass streams the chunk from
# memory, while a block of rows stays in cache between passes. Measured on one core, JSD at
# V = 151,936: 218 ms per 256 rows as one call; 117 in blocks of 8, 120 of 16, 135 of 32. GPUs get
# the whole chunk in one call (a launch per block would dominate).
CPU_BLOCK_ROWS = 16


def _maybe_compiled(fn: F, compile: bool) -> F:
    """fn, or its torch.compile'd twin (built once per process and reused)."""
    if not compile:
        return fn
    if fn not in _COMPILED:
        # Static shapes: a chunk sees at most three block shapes (full, chunk tail, last tail),
        # and dynamic-shape kernels lose the vectorised fixed-length inner loops.
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
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


def _chunk_fn(
    teacher: TeacherData, spec: _Spec, rows: int, like: torch.Tensor
) -> tuple[ChunkFn, int]:
    """(the kernel of one teacher form, rows per block) for chunks of at most `rows` rows.

    The kernel has that form's rows [i, j) of teacher data bound. On CPU with compile, the dense
    forms run the C++ kernel (`losses.native`) over the whole chunk, a row per thread at a time;
    elsewhere (GPU, or eager) they run `dense_chunk`.
    """
    vocab, beta, alpha = spec.vocab_size, spec.beta, spec.alpha
    cpu = like.device.type == "cpu"
    block_rows = max(1, min(CPU_BLOCK_ROWS if cpu else rows, rows))
    if isinstance(teacher, TeacherSampled):
        estimator = _as_estimator(spec.kind)
        present = teacher.token_ids >= 0  # (N,)
        tokens = teacher.token_ids.long().clamp(min=0)  # (N,)
        logprobs = teacher.logprobs.float()  # (N,)
        sampled = _maybe_compiled(sampled_chunk, spec.compile)
        return (
            lambda zs, _, i, j, w, out: sampled(
                zs, tokens[i:j], present[i:j], logprobs[i:j], w, out, estimator
            )
        ), block_rows
    kind = _as_divergence(spec.kind)
    if isinstance(teacher, TeacherTopK):
        valid, ids = valid_ids(teacher.ids, vocab)  # (N, K) each
        log_t = topk_teacher_logprobs(teacher.logprobs, valid)  # (N, K+1)
        topk = _maybe_compiled(topk_chunk, spec.compile)
        return (
            lambda zs, _, i, j, w, out: topk(
                zs, ids[i:j], valid[i:j], log_t[i:j], w, out, kind, beta, alpha
            )
        ), block_rows
    teacher_dtype = (teacher.logits if isinstance(teacher, TeacherLogits) else teacher.hidden).dtype
    if cpu and spec.compile and {like.dtype, teacher_dtype} <= set(native.DTYPES):
        native.extension()  # build (or load) it now: a compiler error surfaces before any chunk
        dense = native.dense_rows
        block_rows = rows  # the kernel takes the chunk's rows one per thread at a time
    else:
        dense = _maybe_compiled(dense_chunk, spec.compile)

    def dense_rows(
        zs: torch.Tensor,
        zt: torch.Tensor | None,
        i: int,
        j: int,
        w: torch.Tensor | None,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        assert zt is not None, "dense teacher forms pass their logits"
        return dense(zs, zt, w, out, kind, beta, alpha)

    return dense_rows, block_rows


def _teacher_logits(
    teacher: TeacherData,
    vocab: int,
    start: int,
    stop: int,
    buf: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor | None:
    """The teacher's (C, V) logits for rows [start, stop) of a dense form, else None."""
    if isinstance(teacher, TeacherLogits):
        return teacher.logits[start:stop, :vocab]
    if isinstance(teacher, TeacherHidden):
        assert buf is not None
        # The teacher's (C, V) logits live only inside its chunk, like the student's.
        rows = slice(0, stop - start)
        lo = residual[rows] if residual is not None else None
        return logits_into(teacher.hidden[start:stop], teacher.weight[:vocab], buf[rows], lo)
    return None


def _chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: TeacherData,
    spec: _Spec,
    token_weight: torch.Tensor | None,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    observe: Observer | None = None,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(values (N,) fp32, ∂(Σ w·D)/∂hidden (N, H) or None, ∂/∂weight (V_s, H) or None)."""
    vocab = spec.vocab_size
    n = hidden.shape[0]
    w_real = weight[:vocab]  # (V, H): padded rows never enter a softmax
    values = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None  # (N, H)
    grad_weight = torch.empty_like(weight) if need_weight_grad else None  # (V_s, H)
    if grad_weight is not None:
        grad_weight[vocab:].zero_()  # padded rows get no gradient; the real rows are written
        if n == 0:  # no chunk will write the real rows either
            grad_weight.zero_()
    if not (need_hidden_grad or need_weight_grad):
        token_weight = None  # values only: skip the gradient math in the kernels
    # (C, V) buffers made once and reused by every chunk: a fresh 78 MB tensor per chunk
    # (C = 256, V = 151,936, bf16) costs ~19k page faults each time.
    rows = min(spec.chunk_size, n)
    exact = spec.exact_logits
    zs_dtype = matmul_out_dtype(hidden, exact)
    zs_buf = buffer(workspace, "zs", rows, vocab, hidden, zs_dtype)  # (C, V)
    zt_buf = None
    if isinstance(teacher, TeacherHidden):
        zt_dtype = matmul_out_dtype(teacher.hidden, exact)
        zt_buf = buffer(workspace, "zt", rows, vocab, hidden, zt_dtype)  # (C, V)

    def residual_for(side: torch.Tensor) -> torch.Tensor | None:
        """(C, V) in side's dtype: exact logits' second term where no fp32-out matmul exists.

        One buffer per dtype: the student's term is folded into its logits before the teacher's
        matmul reuses it.
        """
        if not exact or fp32_out_matmul(side) or matmul_out_dtype(side, exact) == side.dtype:
            return None
        return buffer(workspace, f"residual_{side.dtype}", rows, vocab, hidden, side.dtype)

    residual = residual_for(hidden)
    residual_t = residual_for(teacher.hidden) if isinstance(teacher, TeacherHidden) else None
    dz_buf = None
    if token_weight is not None:
        dz_buf = buffer(workspace, "dz", rows, vocab, hidden, hidden.dtype)  # (C, V)
    chunk, block_rows = _chunk_fn(teacher, spec, rows, hidden)
    for start in range(0, n, spec.chunk_size):
        stop = min(start + spec.chunk_size, n)
        h = hidden[start:stop]  # (C, H)
        lo = residual[: stop - start] if residual is not None else None
        zs = logits_into(h, w_real, zs_buf[: stop - start], lo)  # (C, V)
        if observe is not None:
            observe(zs, start, stop)
        zt = _teacher_logits(teacher, vocab, start, stop, zt_buf, residual_t)  # (C, V) or None
        dz = dz_buf[: stop - start] if dz_buf is not None else None  # (C, V) or None
        for r in range(0, stop - start, block_rows):
            block = slice(r, min(r + block_rows, stop - start))
            i, j = start + block.start, start + block.stop
            w = token_weight[i:j] if token_weight is not None else None  # (R,)
            zt_block = zt[block] if zt is not None else None
            dz_block = dz[block] if dz is not None else None
            values[i:j] = chunk(zs[block], zt_block, i, j, w, dz_block)  # (R,)
        if dz is None:
            continue
        if grad_hidden is not None:
            torch.mm(dz, w_real, out=grad_hidden[start:stop])  # (C, H)
        if grad_weight is not None:
            if start == 0:  # the first chunk writes, so the (V, H) buffer is never zero-filled
                torch.mm(dz.T, h, out=grad_weight[:vocab])  # (V, H)
            else:
                grad_weight[:vocab].addmm_(dz.T, h)  # (V, H) += (V, C) @ (C, H)
    return values, grad_hidden, grad_weight


class _Ctx(torch.autograd.function.FunctionCtx):
    """What our Functions keep on ctx, declared so the type checker sees it."""

    teacher: TeacherData
    spec: _Spec
    workspace: Workspace | None
    saved_tensors: tuple[torch.Tensor, ...]
    needs_input_grad: tuple[bool, ...]


class _PerToken(torch.autograd.Function):
    """Per-token values; backward recomputes each chunk with the incoming gradient."""

    @staticmethod
    def forward(
        ctx: _Ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        teacher: TeacherData,
        spec: _Spec,
        workspace: Workspace | None,
    ) -> torch.Tensor:
        values, _, _ = _chunks(hidden, weight, teacher, spec, None, False, False, None, workspace)
        ctx.save_for_backward(hidden, weight)
        ctx.teacher, ctx.spec, ctx.workspace = teacher, spec, workspace
        return values

    @staticmethod
    def backward(
        ctx: _Ctx, *grad_outputs: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        (grad_values,) = grad_outputs  # (N,)
        hidden, weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        upstream = grad_values.float()
        grads = _chunks(
            hidden, weight, ctx.teacher, ctx.spec, upstream, need_h, need_w, None, ctx.workspace
        )
        return grads[1], grads[2], None, None, None


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
        observe: Observer | None,
        workspace: Workspace | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        weights = token_weight.float()
        values, grad_h, grad_w = _chunks(
            hidden, weight, teacher, spec, weights, need_h, need_w, observe, workspace
        )
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.spec = spec
        ctx.mark_non_differentiable(values)
        loss = (values * token_weight.float()).sum()  # fp32 scalar
        return loss, values

    @staticmethod
    def backward(
        ctx: _Ctx, *grad_outputs: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None, None]:
        grad_loss = grad_outputs[0]  # scalar; the per-token values are non-differentiable
        saved = iter(ctx.saved_tensors)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = next(saved) if need_h else None
        grad_w = next(saved) if need_w else None
        # The usual upstream gradient is exactly 1 (loss.backward()); skip a (V, H) pass then.
        if not bool(grad_loss == 1.0):
            grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
            grad_w = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None


def _spec(
    kind: Divergence | Estimator,
    vocab_size: int,
    beta: float,
    alpha: float,
    chunk_size: int,
    compile: bool,
    exact_logits: bool,
) -> _Spec:
    return _Spec(kind, vocab_size, beta, alpha, chunk_size, compile, exact_logits)


def fused_linear_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: TeacherData,
    kind: Divergence | Estimator,
    *,
    vocab_size: int,
    beta: float = BETA,
    alpha: float = ALPHA,
    chunk_size: int = CHUNK_ROWS,
    compile: bool = False,
    exact_logits: bool = False,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Per-token D(student, teacher) (...) from hidden (..., H) and lm_head weight (V_s, H).

    Same values and gradients as `divergence(kind, *dense_support(...))` (or the top-k and
    sampled forms), without (N, V) logits. kind: a divergence for TeacherHidden/Logits/TopK,
    "k1"/"k2"/"k3" for TeacherSampled. compile=True fuses each chunk's fp32 math with
    torch.compile (one compilation per kind and chunk shape; faster on CPU and GPU), except the
    dense forms on CPU, which then run the C++ kernel of `losses.native` (built once per machine).
    exact_logits: where no fp32-out matmul exists for 16-bit inputs (a CPU without AMX, or a
    PyTorch without MKL), rebuild fp32-accurate logits from a second, residual matmul per side
    (`losses.logits.logits_into`): the loss then matches an fp32 computation of the same bf16
    inputs to ~1e-7 instead of ~1e-4, for ~40% more time. No effect where the fp32-out matmul
    exists (CUDA; AMX CPUs with MKL: `losses.logits.fp32_out_matmul`), or with fp32 inputs.
    workspace: keep the chunk buffers between calls (see `Workspace`).
    """
    spec = _spec(kind, vocab_size, beta, alpha, chunk_size, compile, exact_logits)
    _check(teacher, spec, weight.shape[0])
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    rows = flat_teacher(teacher, flat.shape[0])
    values = _PerToken.apply(flat, weight, rows, spec, workspace)
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
    beta: float = BETA,
    alpha: float = ALPHA,
    chunk_size: int = CHUNK_ROWS,
    compile: bool = False,
    exact_logits: bool = False,
    observe: Observer | None = None,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ token_weight · D scalar, per-token D (...) detached), gradients computed in forward.

    token_weight (...) is what the loop would multiply the per-token values by: loss_mask divided
    by the target tokens of the whole optimizer step. Summing these losses over micro-batches
    gives the full-batch gradient. `observe(logits (C, V), start, stop)` is called once per chunk
    with the student's logits over the real vocabulary of flattened rows [start, stop): a loop's
    diagnostics read them there instead of materialising (N, V) logits of their own.
    exact_logits: see `fused_linear_divergence`.
    workspace: keep the chunk buffers between calls (see `Workspace`); a loop holds one per run.
    """
    spec = _spec(kind, vocab_size, beta, alpha, chunk_size, compile, exact_logits)
    _check(teacher, spec, weight.shape[0])
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    n = flat.shape[0]
    if token_weight.numel() != n:
        raise ValueError(f"token_weight has {token_weight.numel()} entries for {n} positions")
    teacher_rows = flat_teacher(teacher, n)
    weights = token_weight.reshape(n)
    out = _Summed.apply(flat, weight, weights, teacher_rows, spec, observe, workspace)
    assert isinstance(out, tuple)
    loss, values = out
    return loss, values.reshape(hidden.shape[:-1])
