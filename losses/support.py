"""Put student and teacher on one support, as fp32 log-probabilities (..., S).

Dense: the support is the real vocabulary. Both heads are cut to `vocab_size` (the tokenizer's
length) before the softmax, so padded rows (Qwen3: 267 of 151,936) get no probability at all.

Top-k: the support is the teacher's K ids plus one tail bucket holding all the other mass, on each
side: tail = 1 - (mass on the K ids). Every divergence on this coarsened support is a true
divergence (>= 0, 0 iff the coarsened distributions agree) and equals the dense value when K
covers the vocabulary. Plain truncated top-k KL is not a divergence and goes negative.

The student's tail is computed exactly, as a log-sum-exp over the ids outside the top-k, not as
1 - Σ p_k: when the K ids hold 1 - 1e-8 of the mass, fp32 cancellation in 1 - Σ p_k leaves pure
noise, and the gradient through the tail divides by that noise. The teacher's tail can only be
1 - Σ p_k (we have nothing else); it is the constant side, so its noise costs < 1e-6 nats.
Ids must be unique within a position (vLLM's top-K plus sampled token are); dropped ids may repeat.
"""

import math

import torch

from losses.divergences import NEG

# Smallest tail mass we represent: keeps log() and its gradient finite when K covers (nearly) all
# of the mass; a tail below it contributes < 1e-10 nats and no gradient.
TAIL_FLOOR = 1e-12
LOG_TAIL_FLOOR = math.log(TAIL_FLOOR)


def check_head(name: str, rows: int, vocab_size: int) -> None:
    """A head narrower than the tokenizer means another tokenizer: raise, naming the fix."""
    if rows < vocab_size:
        raise ValueError(
            f"{name} head has {rows} rows but the vocabulary has {vocab_size} ids: the tokenizers "
            "differ; use a student that shares the teacher's tokenizer (see losses.vocab)"
        )


def dense_support(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_s, log p_t), each (..., vocab_size), from heads of possibly different widths."""
    check_head("student", student_logits.shape[-1], vocab_size)
    check_head("teacher", teacher_logits.shape[-1], vocab_size)
    log_s = torch.log_softmax(student_logits[..., :vocab_size].float(), dim=-1)  # (..., V)
    log_t = torch.log_softmax(teacher_logits[..., :vocab_size].float(), dim=-1)  # (..., V)
    return log_s, log_t


def log_tail(log_p_k: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ exp(log_p_k)) over the last dim, floored at TAIL_FLOOR: (..., 1).

    A plain sum of exp, not logsumexp: logsumexp's backward is NaN on an all -inf row (every id
    dropped), and that NaN survives a zero upstream gradient.
    """
    covered = log_p_k.exp().sum(-1, keepdim=True)
    return torch.log((1.0 - covered).clamp(min=TAIL_FLOOR))


def valid_ids(teacher_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid (..., K) bool, ids (..., K) int64 clamped into range). Padded-row ids and -1 drop."""
    valid = (teacher_ids >= 0) & (teacher_ids < vocab_size)
    return valid, teacher_ids.long().clamp(0, vocab_size - 1)


def student_topk_parts(
    z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse (..., 1), z_k (..., K), lse_tail (..., 1)) from fp32 logits z (..., V).

    lse_tail is the log-sum-exp over ids outside the valid top-k (NEG-ish when there are none).
    Masking writes NEG, not -inf, so logsumexp and its backward stay finite on an empty tail.
    """
    vocab_size = z.shape[-1]
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (..., 1)
    z_k = z.gather(-1, ids)  # (..., K)
    # Dropped ids point at one extra column, so they mask nothing in the real vocabulary.
    routed = torch.where(valid, ids, torch.full_like(ids, vocab_size))
    extra = torch.full_like(z[..., :1], NEG)
    masked = torch.cat([z, extra], dim=-1).scatter(-1, routed, NEG)  # (..., V+1)
    return lse, z_k, torch.logsumexp(masked, dim=-1, keepdim=True)


def topk_student_logprobs(
    z: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student log-probs (..., K+1), lse (..., 1)) on the top-k + tail support."""
    lse, z_k, lse_tail = student_topk_parts(z, ids, valid)
    log_s_k = torch.where(valid, z_k - lse, float("-inf"))  # (..., K)
    log_s_tail = (lse_tail - lse).clamp(min=LOG_TAIL_FLOOR)  # (..., 1)
    return torch.cat([log_s_k, log_s_tail], dim=-1), lse


def topk_teacher_logprobs(teacher_logprobs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Teacher log-probs (..., K+1) on the top-k + tail support; dropped ids go to the tail."""
    log_t_k = torch.where(valid, teacher_logprobs.float(), float("-inf"))  # (..., K)
    return torch.cat([log_t_k, log_tail(log_t_k)], dim=-1)


def topk_support(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_s, log p_t), each (..., K + 1): the teacher's K ids, then the tail bucket.

    student_logits (..., V_s); teacher_ids (..., K) int; teacher_logprobs (..., K), normalised
    over the teacher's own head (vLLM: the full width, so the teacher's tail also holds its
    negligible padded-row mass). Teacher ids outside [0, vocab_size) (padded rows, or -1 for
    "no entry") are dropped: their mass falls into the tail on both sides.
    """
    check_head("student", student_logits.shape[-1], vocab_size)
    valid, ids = valid_ids(teacher_ids, vocab_size)
    z = student_logits[..., :vocab_size].float()  # (..., V)
    log_s, _ = topk_student_logprobs(z, ids, valid)  # (..., K+1)
    return log_s, topk_teacher_logprobs(teacher_logprobs, valid)  # (..., K+1) each
