"""Batch assembly: step sampling, collation and the one next-token shift."""

from __future__ import annotations

import numpy as np
import torch

from distill.batch import Example, collate, next_token_view, step_batches
from teachers.protocol import TopK


def test_steps_are_uniform_samples_sorted_inside() -> None:
    # Two kinds of example, as thinking (long) and non-thinking (short) responses.
    lengths = [60] * 64 + [20] * 64
    steps = step_batches(lengths, 16, torch.Generator().manual_seed(0))
    flat = [i for step in steps for i in step]
    assert len(steps) == 8 and all(len(s) == 16 for s in steps)
    assert sorted(flat) == list(range(128))  # every example once per epoch
    for step in steps:
        kinds = [lengths[i] for i in step]
        assert kinds == sorted(kinds)  # micro-batches cut in order share lengths
        assert 0 < kinds.count(60) < 16  # never a step of one kind only


def test_steps_drop_the_partial_tail_and_follow_the_seed() -> None:
    a = step_batches(list(range(37)), 8, torch.Generator().manual_seed(3))
    b = step_batches(list(range(37)), 8, torch.Generator().manual_seed(3))
    assert a == b and len(a) == 4


def test_collate_places_teacher_rows_at_their_tokens_and_shift_aligns_them() -> None:
    topk = TopK(
        ids=np.array([[7, 1], [8, 1], [9, 1]], dtype=np.int32),
        logprobs=np.full((3, 2), -0.5, dtype=np.float32),
        actual_logprobs=np.zeros(3, dtype=np.float32),
    )
    example = Example(
        prompt_ids=[1, 2], response_ids=[7, 8, 9], train=np.array([True, False, True]), topk=topk
    )
    batch = collate([example], pad_id=0)
    assert batch.loss_mask.tolist() == [[False, False, True, False, True]]
    logits = torch.zeros(1, 5, 12)
    shifted, targets, mask, t_ids, _ = next_token_view(logits, batch)
    assert shifted.shape == (1, 4, 12)
    assert t_ids is not None
    # logits at position j predict targets[j] = token j+1, described by teacher row j+1
    assert targets.tolist() == [[2, 7, 8, 9]]
    assert t_ids[0, :, 0].tolist() == [-1, 7, 8, 9]
    assert mask.tolist() == [[False, True, False, True]]
