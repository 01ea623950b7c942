"""The fused path's logit matmuls: bf16 inputs, and fp32 logits wherever they can be had."""

import torch


def matmul_out_dtype(hidden: torch.Tensor, exact_logits: bool = False) -> torch.dtype:
    """The dtype of the logits the fused path's matmuls produce from `hidden`'s dtype.

    fp32 where a bf16/fp16-in, fp32-out matmul exists (CUDA: `torch.mm(..., out_dtype=)`, fp32
    accumulation written without rounding); elsewhere the inputs' dtype. PyTorch's CPU matmul has
    no such variant (2.13: `aten::mm.dtype` is not implemented for CPU), so on CPU bf16 logits
    carry one bf16 rounding (relative 2^-9) before the fp32 softmax, unless `exact_logits`:
    then fp32 logits are rebuilt from two bf16 matmuls (see `logits_into`).
    """
    low = hidden.dtype in (torch.bfloat16, torch.float16)
    if low and (hidden.device.type == "cuda" or exact_logits):
        return torch.float32
    return hidden.dtype


def logits_into(
    h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """h (C, H) @ w (V, H).T into out (C, V); an fp32 out with bf16 inputs skips the rounding.

    With no fp32-out matmul (CPU), an fp32 `out` is filled from two bf16 matmuls through
    `residual`, a (C, V) buffer in h's dtype: hi = bf16(h @ w.T), then lo = bf16(h @ w.T - hi),
    where addmm subtracts hi from its fp32 accumulator before rounding. hi + lo in fp32 carries
    the rounding of lo only, about 2^-9 of hi's own error: ~2^-17 relative, like an fp32 result
    of the same bf16 inputs (measured: max error 4.7e-6 of the largest logit, against 2.3e-3
    for hi alone), for a second forward matmul.
    """
    if out.dtype == h.dtype:
        return torch.mm(h, w.T, out=out)
    if out.device.type == "cuda" or residual is None:
        return torch.mm(h, w.T, out_dtype=out.dtype, out=out)
    torch.mm(h, w.T, out=residual)  # hi, rounded
    out.copy_(residual)
    residual.addmm_(h, w.T, beta=-1.0)  # lo = bf16(h @ w.T - hi), the rounding error of hi
    return out.add_(residual)
