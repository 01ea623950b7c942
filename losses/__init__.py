"""Divergences between a student and a teacher, per token. Imports torch and the stdlib only.

Shape legend, used across the project where tensors are born:
    B batch, T tokens, V vocab (real ids, the tokenizer's length), V_s / V_t head rows (>= V;
    the extra rows are padding), K teacher top-k, S support (V, or K + 1 with the tail bucket),
    G samples per prompt, N flattened tokens (B*T), H hidden size, C rows in one chunk.

Every divergence returns one value per token, (B, T) or (N,); masking and normalisation belong
to the training loop, which divides by the target tokens of the whole optimizer step.

Three forms of teacher data: dense (`dense_support`, or `TeacherHidden`/`TeacherLogits` on the
fused path), top-k with a tail bucket (`topk_support`, `TeacherTopK`) and the sampled token's
log-prob (`losses.sampled`, `TeacherSampled`). `fused_linear_divergence[_sum]` computes any of
them chunk by chunk from hidden states and the lm_head, never holding (N, V) logits; a
`Workspace` keeps its chunk buffers between calls. On CPU with compile=True its dense forms run
a C++ kernel (`losses/dense_cpu.cpp`), built on first use through torch's cpp_extension
(`losses.native`).
"""

from losses.divergences import (
    ALPHA,
    BETA,
    DIVERGENCES,
    Divergence,
    DivergenceSpec,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from losses.fused import fused_linear_divergence, fused_linear_divergence_sum
from losses.logits import matmul_out_dtype
from losses.sampled import ESTIMATORS, Estimator, estimator, k1, k2, k3, sampled_logprobs
from losses.support import dense_support, topk_support
from losses.teacher_data import (
    TeacherData,
    TeacherHidden,
    TeacherLogits,
    TeacherSampled,
    TeacherTopK,
)
from losses.vocab import check_heads, shared_vocab_size
from losses.workspace import Workspace

__all__ = [
    "ALPHA",
    "BETA",
    "DIVERGENCES",
    "ESTIMATORS",
    "Divergence",
    "DivergenceSpec",
    "Estimator",
    "TeacherData",
    "TeacherHidden",
    "TeacherLogits",
    "TeacherSampled",
    "TeacherTopK",
    "Workspace",
    "check_heads",
    "dense_support",
    "divergence",
    "estimator",
    "forward_kl",
    "fused_linear_divergence",
    "fused_linear_divergence_sum",
    "jsd",
    "k1",
    "k2",
    "k3",
    "matmul_out_dtype",
    "reverse_kl",
    "sampled_logprobs",
    "shared_vocab_size",
    "skew_forward_kl",
    "skew_reverse_kl",
    "topk_support",
    "tvd",
]
