"""Put student and teacher on one support, as fp32 log-probabilities (..., S).

Dense: the support is the real vocabulary. Both heads are cut to `vocab_size` (the tokenizer's
length) before the softmax, so padded rows (Qwen3: 267 of 151,936) get no probability at all.

Top-k: the support is the teacher's K ids plus one tail bucket holding all the other mass, on each
side: tail = 1 - (mass on the K ids). Every divergence on this coarsened support is a true
divergence (>= 0, 0 iff the coarsened distributions agree) and equals the dense value when K
covers the vocabulary. Plain truncated top-k KL is not a divergence and goes negative.
"""

import torch

# Smallest tail mass we represent: keeps log() and its gradient finite when K covers (nearly) all
# of the mass; a tail below it contributes < 1e-12 nats.
TAIL_FLOOR = 1e-12


def dense_support(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_s, log p_t), each (..., vocab_size), from heads of possibly different widths."""
    for name, x in (("student", student_logits), ("teacher", teacher_logits)):
        if x.shape[-1] < vocab_size:
            raise ValueError(
                f"{name} head has {x.shape[-1]} rows but the vocabulary has {vocab_size} ids: "
                "the tokenizers differ; use a student that shares the teacher's tokenizer"
            )
    log_s = torch.log_softmax(student_logits[..., :vocab_size].float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits[..., :vocab_size].float(), dim=-1)
    return log_s, log_t


def log_tail(log_p_k: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(log_p_k))) over the last dim, stable, floored at TAIL_FLOOR: (..., 1)."""
    covered = torch.logsumexp(log_p_k, dim=-1, keepdim=True)
    return torch.log((-torch.expm1(covered)).clamp(min=TAIL_FLOOR))


def topk_support(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_s, log p_t), each (..., K + 1): the teacher's K ids, then the tail bucket.

    student_logits (..., V_s); teacher_ids (..., K) int; teacher_logprobs (..., K), normalised
    over the teacher's own head (vLLM: the full width). Teacher ids outside [0, vocab_size)
    (padded rows, or -1 for "no entry") are dropped: their teacher mass falls into the tail.
    """
    if student_logits.shape[-1] < vocab_size:
        raise ValueError(
            f"student head has {student_logits.shape[-1]} rows for a {vocab_size}-id vocabulary"
        )
    log_s_all = torch.log_softmax(student_logits[..., :vocab_size].float(), dim=-1)  # (..., V)
    valid = (teacher_ids >= 0) & (teacher_ids < vocab_size)  # (..., K)
    ids = teacher_ids.long().clamp(0, vocab_size - 1)
    neg_inf = torch.tensor(float("-inf"), device=log_s_all.device)
    log_s_k = torch.where(valid, log_s_all.gather(-1, ids), neg_inf)  # (..., K)
    log_t_k = torch.where(valid, teacher_logprobs.float(), neg_inf)  # (..., K)
    log_s = torch.cat([log_s_k, log_tail(log_s_k)], dim=-1)  # (..., K+1)
    log_t = torch.cat([log_t_k, log_tail(log_t_k)], dim=-1)  # (..., K+1)
    return log_s, log_t
