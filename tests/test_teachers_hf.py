"""HFTeacher, the reference backend: alignment, chunking, batching, top-k order, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from students.sample import SamplingParams
from teachers.hf import HFTeacher
from teachers.protocol import TeacherError, TopK, check_scores
from tests.conftest import TinyPair


@pytest.fixture(scope="module")
def teacher(tiny_pair: TinyPair) -> HFTeacher:
    return HFTeacher.from_pretrained(tiny_pair.teacher_dir)


def sequences(n: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 40, size=n)
    seqs = [rng.integers(0, vocab, size=int(L)).tolist() for L in lengths]
    return seqs, [int(rng.integers(1, L)) for L in lengths]


def test_alignment_against_a_naive_forward(teacher: HFTeacher) -> None:
    """Row t of a completion comes from the logits at P + t - 1 and scores token P + t."""
    seqs, plens = sequences(3, teacher.vocab_size)
    scores = teacher.score(seqs, plens, top_k=5)
    for s, P, sc in zip(seqs, plens, scores, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(teacher.model(torch.tensor([s])).logits[0].float(), -1)
        for t in range(len(s) - P):
            row = logp[P + t - 1]  # (W,)
            assert sc.actual_logprobs[t] == pytest.approx(float(row[s[P + t]]), abs=1e-5)
            vals, ids = torch.topk(row, 5)
            np.testing.assert_array_equal(sc.ids[t], ids.numpy())
            np.testing.assert_allclose(sc.logprobs[t], vals.numpy(), atol=1e-5)
        assert (np.diff(sc.logprobs, axis=-1) <= 0).all()  # rank order
        assert sc.ids.dtype == np.int32 and sc.logprobs.dtype == np.float32


def test_chunking_and_batching_do_not_change_scores(
    tiny_pair: TinyPair, teacher: HFTeacher
) -> None:
    seqs, plens = sequences(5, teacher.vocab_size, seed=1)
    small = HFTeacher.from_pretrained(tiny_pair.teacher_dir)
    small.batch_size, small.chunk = 2, 3  # padding across sequences, many chunks per sequence
    for a, b in zip(teacher.score(seqs, plens, 4), small.score(seqs, plens, 4), strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.actual_logprobs, b.actual_logprobs, atol=1e-5)


def test_shape_and_generation(teacher: HFTeacher, tiny_pair: TinyPair) -> None:
    assert teacher.vocab_size == len(tiny_pair.tokenizer) < teacher.logits_width == 512
    params = SamplingParams(temperature=0.0, max_tokens=12)
    a = teacher.generate([[1, 2, 3], [4, 5]], params)
    b = teacher.generate([[1, 2, 3], [4, 5]], params)
    assert [g.token_ids.tolist() for g in a] == [g.token_ids.tolist() for g in b]
    for g in a:
        assert (g.token_ids < teacher.vocab_size).all()  # padded rows are never sampled
        assert g.finish_reason == "length" or g.token_ids[-1] == tiny_pair.tokenizer.eos_token_id


def test_bad_input_names_the_problem(teacher: HFTeacher) -> None:
    with pytest.raises(TeacherError, match="top_k"):
        teacher.score([[1, 2, 3]], [1], top_k=teacher.max_top_k + 1)
    bad = TopK(
        ids=np.zeros((2, 1), np.int32),
        logprobs=np.array([[0.0], [np.nan]], np.float32),
        actual_logprobs=np.zeros(2, np.float32),
    )
    good = TopK(
        ids=np.zeros((2, 1), np.int32),
        logprobs=np.zeros((2, 1), np.float32),
        actual_logprobs=np.zeros(2, np.float32),
    )
    with pytest.raises(TeacherError, match="sequence 1"):
        check_scores([good, bad], "t")
