"""The fused path's logit matmuls: bf16 inputs, and fp32 logits wherever they can be had."""

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch

LOW = (torch.bfloat16, torch.float16)
# cblas constants (mkl_cblas.h): row-major layout, B transposed (w is (V, H), the product h @ w.T).
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@functools.cache
def _mkl_gemm(dtype: torch.dtype) -> Callable[..., None] | None:
    """MKL's `cblas_gemm_bf16bf16f32` (or `_f16f16f32`) from PyTorch's own CPU library, or None.

    PyTorch's x86 CPU builds link MKL into libtorch_cpu and export its mixed-precision GEMMs:
    16-bit inputs, fp32 accumulation, fp32 output, no rounding of the result. Used only where
    the CPU has AMX tiles, where it runs within 2x of the bf16 matmul (Intel Xeon, 2 cores,
    256 x 1,024 x 151,936: 88 ms, against 48 ms for oneDNN's bf16 `torch.mm`, which rounds every
    logit to 2^-9, and 459 ms in fp32); without AMX MKL fell far behind (AMD Zen 5 with
    AVX512-BF16: 577 ms against 88). Called through ctypes, which releases the GIL for the call.
    """
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: absent in some builds
    if not (torch.backends.mkl.is_available() and amx is not None and amx()):
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        name = "bf16bf16f32" if dtype == torch.bfloat16 else "f16f16f32"
        fn = getattr(lib, f"cblas_gemm_{name}")
    except (OSError, AttributeError):
        return None
    i, p = ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [i, i, i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
    fn.restype = None
    return fn


def fp32_out_matmul(side: torch.Tensor) -> bool:
    """Whether a 16-bit `side` has a matmul that writes fp32 logits without rounding them:
    CUDA (`torch.mm(..., out_dtype=)`), and CPUs with AMX where PyTorch carries MKL (`_mkl_gemm`).
    PyTorch's own CPU matmul has no such variant (2.13: `aten::mm.dtype` is not implemented)."""
    if side.dtype not in LOW:
        return False
    if side.device.type == "cuda":
        return True
    return side.device.type == "cpu" and _mkl_gemm(side.dtype) is not None


def matmul_out_dtype(hidden: torch.Tensor, exact_logits: bool = False) -> torch.dtype:
    """The dtype of the logits the fused path's matmuls produce from `hidden`'s dtype.

    fp32 where a 16-bit-in, fp32-out matmul exists (`fp32_out_matmul`: fp32 accumulation
    written without rounding); elsewhere the inputs' dtype: 16-bit logits carry one rounding
    (bf16: relative 2^-9) before the fp32 softmax, unless `exact_logits`: then fp32 logits are
    rebuilt from two 16-bit matmuls (see `logits_into`).
    """
    if hidden.dtype in LOW and (fp32_out_matmul(hidden) or exact_logits):
        return torch.float32
    return hidden.dtype


def logits_into(
    h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """h (C, H) @ w (V, H).T into out (C, V); an fp32 out with 16-bit inputs skips the rounding.

    With no fp32-out matmul, an fp32 `out` is filled from two 16-bit matmuls through
    `residual`, a (C, V) buffer in h's dtype: hi = bf16(h @ w.T), then lo = bf16(h @ w.T - hi),
    where addmm subtracts hi from its fp32 accumulator before rounding. hi + lo in fp32 carries
    the rounding of lo only, about 2^-9 of hi's own error: ~2^-17 relative, like an fp32 result
    of the same bf16 inputs (measured: max error 4.7e-6 of the largest logit, against 2.3e-3
    for hi alone), for a second forward matmul.
    """
    if out.dtype == h.dtype:
        return torch.mm(h, w.T, out=out)
    if out.device.type == "cpu" and fp32_out_matmul(h) and w.dtype == h.dtype:
        return _mkl_logits_into(h, w, out)
    if out.device.type == "cuda" or residual is None:
        return torch.mm(h, w.T, out_dtype=out.dtype, out=out)
    torch.mm(h, w.T, out=residual)  # hi, rounded
    out.copy_(residual)
    residual.addmm_(h, w.T, beta=-1.0)  # lo = bf16(h @ w.T - hi), the rounding error of hi
    return out.add_(residual)


def _mkl_logits_into(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`logits_into` through MKL's fp32-out GEMM: rows of h, w and out must be unit-stride."""
    (m, k), n = h.shape, w.shape[0]
    assert w.shape[1] == k and out.shape == (m, n) and out.dtype == torch.float32, (
        h.shape, w.shape, out.shape, out.dtype,
    )  # fmt: skip
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    h, w = _rows(h), _rows(w)
    target = out if _unit_rows(out) else torch.empty(out.shape, dtype=out.dtype)
    gemm = _mkl_gemm(h.dtype)
    assert gemm is not None
    # Row-major C (m, n) = A (m, k) @ B^T, B (n, k): the leading dimensions are the row strides.
    gemm(_ROW_MAJOR, _NO_TRANS, _TRANS, m, n, k, 1.0, h.data_ptr(), _ld(h), w.data_ptr(), _ld(w),
         0.0, target.data_ptr(), _ld(target))  # fmt: skip
    return out if target is out else out.copy_(target)


def _unit_rows(t: torch.Tensor) -> bool:
    """A 2-D tensor BLAS can read as row-major: unit-stride rows that do not overlap."""
    return t.stride(1) == 1 and (t.shape[0] == 1 or t.stride(0) >= t.shape[1])


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if _unit_rows(t) else t.contiguous()


def _ld(t: torch.Tensor) -> int:
    """The leading dimension: the row stride (any value >= the row length for one row)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]
