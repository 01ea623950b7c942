"""Divergences between a student and a teacher, per token. Imports torch and the standard library only.

Shape legend, used across the project where tensors are born:
    B batch, T tokens, V vocab (head rows), K teacher top-k, S support (V, or K + 1 with the tail
    bucket), G samples per prompt, N flattened tokens (B*T), H hidden size.

Every divergence returns one value per token, (B, T) or (N,); masking and normalisation belong
to the training loop, which divides by the target tokens of the whole optimizer step.
"""

from losses.divergences import (
    DIVERGENCES,
    Divergence,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from losses.support import dense_support, topk_support

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "dense_support",
    "divergence",
    "forward_kl",
    "jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "topk_support",
    "tvd",
]
