"""The teacher's data for the fused path, in one of four forms; it never gets a gradient.

`TeacherHidden` (final hidden states and lm_head: the teacher's logits are never materialised),
`TeacherLogits`, `TeacherTopK` (ids and log-probs per position, as vLLM returns them; top-k +
tail support) and `TeacherSampled` (the teacher's log-prob of the token the student sampled, for
the k1/k2/k3 estimators). `losses.fused` takes any of them.
"""

from dataclasses import dataclass

import torch


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


def flat_teacher(teacher: TeacherData, n: int) -> TeacherData:
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
