"""Buffers the fused path reuses between calls, so their pages are faulted in once per run."""

import torch


class Workspace:
    """The fused path's (C, V) buffers, kept between calls by a caller that makes many of them.

    Each call needs up to three (C, V) buffers (student logits, teacher logits, dz), plus a
    residual with `exact_logits`: 234 MB of bf16 at C = 256 and Qwen3's vocabulary. Made fresh,
    the operating system faults and zeroes every page of them on first touch, on every call
    (~57k page faults). A training loop that keeps one Workspace for its run makes them
    once; the memory stays held between steps, the trade a GPU's caching allocator makes too.
    Not thread-safe: one Workspace per concurrent caller.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, rows: int, cols: int, like: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """An uninitialised (rows, cols) tensor of dtype on like's device, reused when it fits."""
        buf = self._buffers.pop(name, None)
        if buf is not None and (
            buf.dtype != dtype
            or buf.device != like.device
            or buf.shape[1] != cols
            or buf.shape[0] < rows
        ):
            buf = None  # freed before its successor is made
        if buf is None:
            buf = like.new_empty(rows, cols, dtype=dtype)
        self._buffers[name] = buf
        return buf[:rows]

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def buffer(
    workspace: Workspace | None,
    name: str,
    rows: int,
    cols: int,
    like: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    if workspace is None:
        return like.new_empty(rows, cols, dtype=dtype)
    return workspace.get(name, rows, cols, like, dtype)
