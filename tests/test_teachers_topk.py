"""TopK's packed storage: ids exact, log-probabilities within 2^-(23 - tag_bits), 6K + 4 bytes.

Ids keep their low 16 bits as uint16; the bits above ride in the lowest mantissa bits of their
fp32 log-probability (teachers/protocol.py). Fast: numpy only, plus one 1-layer model with
Qwen3's 151,936-row head so a real backend's scores go through the tagged path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen3Config, Qwen3ForCausalLM

from teachers.hf import HFTeacher
from teachers.protocol import MAX_TAG_BITS, TeacherError, TopK, check_scores

QWEN3_WIDTH = 151_936
L, K = 37, 8


def random_scores(width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(L, K) ids below `width` (the largest id forced in) and rank-ordered log-probabilities."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, width, size=(L, K)).astype(np.int32)
    ids[0, 0] = width - 1
    lps = -np.sort(rng.exponential(4.0, size=(L, K)), axis=-1).astype(np.float32)
    lps[1, 0] = 0.0  # probability 1
    lps[2, 0] = -1e-30  # a tiny magnitude: the tag must not turn it into a large error
    return ids, lps


@pytest.mark.parametrize(
    ("width", "tag_bits"),
    [(512, 0), (2**16, 0), (QWEN3_WIDTH, 2), (2**18, 2), (2**20, 4), (2**23, MAX_TAG_BITS)],
)
def test_round_trip_and_bytes(width: int, tag_bits: int) -> None:
    ids, lps = random_scores(width)
    actual = lps[:, 3].copy()
    topk = TopK(ids=ids, logprobs=lps, actual_logprobs=actual)
    assert topk.tag_bits == tag_bits and topk.k == K
    assert topk.ids.dtype == np.int32 and topk.logprobs.dtype == np.float32
    np.testing.assert_array_equal(topk.ids, ids)
    np.testing.assert_allclose(topk.logprobs, lps, rtol=2.0 ** -(23 - tag_bits), atol=0)
    if tag_bits == 0:
        np.testing.assert_array_equal(topk.logprobs, lps)  # nothing stolen: exact
    np.testing.assert_array_equal(topk.actual_logprobs, actual)
    assert (np.diff(topk.logprobs, axis=-1) <= 0).all()  # rank order survives the truncation
    assert topk.nbytes == L * (6 * K + 4)


def test_ids_near_the_top_of_18_bits() -> None:
    ids = np.arange(2**18 - L * K, 2**18, dtype=np.int32).reshape(L, K)  # up to 2^18 - 1
    lps = -np.linspace(0.0, 30.0, L * K, dtype=np.float32).reshape(L, K)
    topk = TopK(ids=ids, logprobs=lps, actual_logprobs=np.zeros(L, np.float32))
    assert topk.tag_bits == 2
    np.testing.assert_array_equal(topk.ids, ids)
    assert np.abs(topk.logprobs - lps).max() <= 30.0 * 2.0**-21


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**23 - 1),
            st.floats(-1e4, 0.0, width=32, allow_subnormal=True),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_round_trip_any_id_and_finite_logprob(pairs: list[tuple[int, float]]) -> None:
    ids = np.array([[i] for i, _ in pairs], dtype=np.int32)  # (L, 1)
    lps = np.array([[v] for _, v in pairs], dtype=np.float32)  # (L, 1)
    topk = TopK(ids=ids, logprobs=lps, actual_logprobs=lps[:, 0].copy())
    np.testing.assert_array_equal(topk.ids, ids)
    b = topk.tag_bits
    # Relative for normal floats; a subnormal (|x| < 1.2e-38) has no exponent to keep.
    bound = np.maximum(np.abs(lps.astype(np.float64)) * 2.0 ** -(23 - b), 2.0 ** (b - 149))
    assert (np.abs(topk.logprobs.astype(np.float64) - lps) <= bound).all()


def test_vocabularies_past_2_23_and_padding_ids_stay_int32_and_exact() -> None:
    for ids in (random_scores(2**24)[0], np.full((L, K), -1, np.int32)):
        lps = random_scores(2**24)[1]
        topk = TopK(ids=ids, logprobs=lps, actual_logprobs=np.zeros(L, np.float32))
        assert topk.tag_bits == 0 and topk.low_ids.dtype == np.int32
        np.testing.assert_array_equal(topk.ids, ids)
        np.testing.assert_array_equal(topk.logprobs, lps)
        assert topk.nbytes == L * (8 * K + 4)


def test_minus_inf_survives_and_nan_names_the_sequence() -> None:
    ids, lps = random_scores(QWEN3_WIDTH)
    lps[5, -1] = -np.inf  # a tag in -inf's mantissa would read back as NaN
    topk = TopK(ids=ids, logprobs=lps, actual_logprobs=np.zeros(L, np.float32))
    assert topk.logprobs[5, -1] == -np.inf and not np.isnan(topk.logprobs).any()
    np.testing.assert_array_equal(topk.ids, ids)
    lps[5, -1] = np.nan
    bad = TopK(ids=ids, logprobs=lps, actual_logprobs=np.zeros(L, np.float32))
    good = TopK(ids=ids, logprobs=random_scores(QWEN3_WIDTH)[1], actual_logprobs=lps[:, 0])
    assert good.tag_bits == 2 and good.all_finite() and not bad.all_finite()
    with pytest.raises(TeacherError, match="for sequence 1;"):
        check_scores([good, bad], "t")


def test_decoded_arrays_are_fresh_and_views_count_their_buffer() -> None:
    ids, lps = random_scores(QWEN3_WIDTH)
    topk = TopK(ids=ids, logprobs=lps, actual_logprobs=np.zeros(L, np.float32))
    topk.ids[0, 0] = 7
    topk.logprobs[0, 0] = 1.0
    assert topk.ids[0, 0] == QWEN3_WIDTH - 1 and topk.logprobs[0, 0] <= 0.0
    # An actual-logprob column that is a view keeps its whole (L, 100) buffer alive.
    big = np.zeros((100, L), np.float32)
    held = TopK(ids=ids, logprobs=lps, actual_logprobs=big[0])
    assert held.nbytes == L * 6 * K + big.nbytes


def test_hf_scores_at_qwen3_width_go_through_the_tags() -> None:
    """A 1-layer model with Qwen3's head: the packed top-k equals a naive log-softmax top-k."""
    config = Qwen3Config(
        vocab_size=QWEN3_WIDTH,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).float()
    teacher = HFTeacher(model, vocab_size=QWEN3_WIDTH, eos_id=0, pad_id=0, name="wide")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, QWEN3_WIDTH, size=n).tolist() for n in (12, 20)]
    scores = teacher.score(seqs, [3, 5], top_k=K)
    assert any(s.tag_bits == 2 for s in scores)  # some top-k id is >= 2^17
    for s, seq, P in zip(scores, seqs, [3, 5], strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        vals, idx = torch.topk(logp[P - 1 : len(seq) - 1], K)  # (L, K)
        np.testing.assert_array_equal(s.ids, idx.numpy())
        np.testing.assert_allclose(s.logprobs, vals.numpy(), atol=1e-5, rtol=0)
        assert s.nbytes == (len(seq) - P) * (6 * K + 4)
