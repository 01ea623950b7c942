"""Loss math against naive references written here: values, gradients, closed forms, properties.

Run: pytest tests/test_losses.py -q
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import (
    Divergence,
    dense_support,
    divergence,
    estimator,
    sampled_logprobs,
    shared_vocab_size,
    topk_support,
)
from losses.gradients import value_and_grad
from losses.sampled import Estimator

# Every divergence variant, with its parameter; the ends of the families included.
VARIANTS: list[tuple[Divergence, float, float]] = [
    ("forward_kl", 0.5, 0.1),
    ("reverse_kl", 0.5, 0.1),
    ("jsd", 0.0, 0.1),
    ("jsd", 0.3, 0.1),
    ("jsd", 0.5, 0.1),
    ("jsd", 1.0, 0.1),
    ("skew_fkl", 0.5, 0.0),
    ("skew_fkl", 0.5, 0.1),
    ("skew_rkl", 0.5, 0.0),
    ("skew_rkl", 0.5, 0.25),
    ("tvd", 0.5, 0.1),
]
VARIANT_IDS = [f"{k}-b{b}-a{a}" for k, b, a in VARIANTS]
SHAPES = [(1, 3, 7), (2, 7, 11), (3, 5, 13)]  # (B, T, V), odd on purpose
DTYPES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 2e-2)}  # (value rtol, grad rtol)


def reference(
    kind: str, q: torch.Tensor, p: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor:
    """Naive float64 divergence of student q from teacher p, (..., S) -> (...), by definition."""

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        terms = torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a))
        return terms.sum(-1)

    if kind == "forward_kl" or (kind, beta) == ("jsd", 0.0) or (kind, alpha) == ("skew_fkl", 0):
        return kl(p, q)
    if kind == "reverse_kl" or (kind, beta) == ("jsd", 1.0) or (kind, alpha) == ("skew_rkl", 0):
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_fkl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_rkl":
        return kl(q, alpha * q + (1 - alpha) * p)
    return 0.5 * (p - q).abs().sum(-1)


def naive_topk(
    student_logits: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarsened (q, p) on the top-k + tail support, position by position, in float64."""
    q_full = torch.softmax(student_logits[..., :vocab].double(), -1)
    qs, ps = [], []
    for pos in range(ids.shape[0]):
        keep = [i for i, t in enumerate(ids[pos].tolist()) if 0 <= t < vocab]
        q_k = torch.zeros(ids.shape[1], dtype=torch.float64)
        p_k = torch.zeros(ids.shape[1], dtype=torch.float64)
        for i in keep:
            q_k[i] = q_full[pos, ids[pos, i]]
            p_k[i] = teacher_logprobs[pos, i].double().exp()
        q_tail = q_full[pos].sum() - q_k.sum()  # mass outside the kept ids, summed directly
        qs.append(torch.cat([q_k, q_tail.clamp(min=1e-12).reshape(1)]))
        ps.append(torch.cat([p_k, (1 - p_k.sum()).clamp(min=1e-12).reshape(1)]))
    return torch.stack(qs), torch.stack(ps)


def make_logits(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("kind", "beta", "alpha"), VARIANTS, ids=VARIANT_IDS)
def test_dense_matches_reference(shape, dtype, kind, beta, alpha):
    vocab = shape[-1]
    # Heads wider than the vocabulary: padded rows must not matter.
    s = make_logits((*shape[:-1], vocab + 2), 0, dtype).requires_grad_()
    t = make_logits((*shape[:-1], vocab + 3), 1, dtype)
    value = divergence(kind, *dense_support(s, t, vocab), beta=beta, alpha=alpha)  # (B, T)
    s64 = s.detach().double().requires_grad_()
    q = torch.softmax(s64[..., :vocab], -1)
    p = torch.softmax(t[..., :vocab].double(), -1)
    ref = reference(kind, q, p, beta, alpha)
    vtol, gtol = DTYPES[dtype]
    torch.testing.assert_close(value.double(), ref, rtol=vtol, atol=1e-6)
    w = torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape)  # arbitrary upstream grad
    (grad,) = torch.autograd.grad((value * w).sum(), s)
    (ref_grad,) = torch.autograd.grad((ref * w.double()).sum(), s64)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=gtol, atol=gtol * 1e-1)
    assert grad[..., vocab:].abs().max() == 0  # padded rows get no gradient


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("kind", "beta", "alpha"), VARIANTS, ids=VARIANT_IDS)
def test_topk_matches_reference(shape, kind, beta, alpha):
    _, _, vocab = shape
    n, k = shape[0] * shape[1], 4
    s = make_logits((n, vocab + 1), 2, torch.float32).requires_grad_()
    teacher_full = torch.log_softmax(make_logits((n, vocab + 3), 3, torch.float32), -1)
    ids = torch.argsort(teacher_full, -1, descending=True)[:, :k]  # may include padded rows
    ids[0, -1] = -1  # "no entry", as a padded vLLM answer
    lp = teacher_full.gather(-1, ids.clamp(min=0))
    value = divergence(kind, *topk_support(s, ids, lp, vocab), beta=beta, alpha=alpha)  # (N,)
    s64 = s.detach().double().requires_grad_()
    q, p = naive_topk(s64, ids, lp, vocab)
    ref = reference(kind, q, p, beta, alpha)
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(value.sum(), s)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("kind", "beta", "alpha"), VARIANTS, ids=VARIANT_IDS)
def test_topk_with_k_equal_v_is_dense(kind, beta, alpha):
    vocab = 11
    s = make_logits((5, vocab), 4, torch.float32).requires_grad_()
    t = make_logits((5, vocab), 5, torch.float32)
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(0)).repeat(5, 1)
    lp = torch.log_softmax(t, -1).gather(-1, ids)
    top = divergence(kind, *topk_support(s, ids, lp, vocab), beta=beta, alpha=alpha)
    dense = divergence(kind, *dense_support(s, t, vocab), beta=beta, alpha=alpha)
    torch.testing.assert_close(top, dense, rtol=1e-5, atol=2e-6)
    g_top, g_dense = (torch.autograd.grad(x.sum(), s)[0] for x in (top, dense))
    torch.testing.assert_close(g_top, g_dense, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize(("kind", "beta", "alpha"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_closed_form_gradient_matches_autograd(kind, beta, alpha, form):
    s = make_logits((6, 9), 6, torch.float32).requires_grad_()
    t = make_logits((6, 9), 7, torch.float32)
    if form == "dense":
        log_s, log_t = dense_support(s, t, 9)
    else:
        ids = torch.tensor([[0, 3, 5, -1]] * 6)  # a dropped id puts -inf on the support
        log_s, log_t = topk_support(s, ids, torch.log_softmax(t, -1).gather(-1, ids.clamp(0)), 9)
    leaf = log_s.detach().requires_grad_()
    value = divergence(kind, leaf, log_t, beta=beta, alpha=alpha)
    (auto,) = torch.autograd.grad(value.sum(), leaf)
    closed_value, closed = value_and_grad(kind, leaf.detach(), log_t, beta=beta, alpha=alpha)
    torch.testing.assert_close(closed_value, value.detach())
    torch.testing.assert_close(closed, auto, rtol=1e-5, atol=1e-7)


def test_closed_form_kl():
    log_p = torch.tensor([0.9, 0.1]).log()
    log_q = torch.tensor([0.1, 0.9]).log()
    expected = 0.8 * math.log(9)  # 1.757780
    assert divergence("forward_kl", log_q, log_p).item() == pytest.approx(expected, rel=1e-6)
    assert divergence("reverse_kl", log_p, log_q).item() == pytest.approx(expected, rel=1e-6)
    assert divergence("tvd", log_q, log_p).item() == pytest.approx(0.8, rel=1e-6)
    half = divergence("jsd", log_q, log_p, beta=0.5).item()
    assert 0 < half < math.log(2)


def test_truncated_topk_would_go_negative_but_tail_does_not():
    # Student puts more mass than the teacher on the top id: the truncated sum is negative.
    log_t = torch.tensor([[0.5, 0.5]]).log()
    s = torch.tensor([[3.0, 0.0]])
    ids, lp = torch.tensor([[0]]), log_t[:, :1]
    truncated = (lp.exp() * (lp - torch.log_softmax(s, -1)[:, :1])).sum()
    assert truncated < 0
    assert divergence("forward_kl", *topk_support(s, ids, lp, 2)).item() >= 0


@pytest.mark.parametrize(("kind", "beta", "alpha"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_all_masked_gives_zero_not_nan(kind, beta, alpha, form):
    s = make_logits((2, 3, 7), 8, torch.float32).requires_grad_()
    t = make_logits((2, 3, 7), 9, torch.float32)
    if form == "dense":
        value = divergence(kind, *dense_support(s, t, 7), beta=beta, alpha=alpha)
    else:  # every id dropped, as on padding positions
        ids = torch.full((2, 3, 4), -1)
        sup = topk_support(s, ids, torch.zeros(2, 3, 4), 7)
        value = divergence(kind, *sup, beta=beta, alpha=alpha)
    mask = torch.zeros(2, 3)
    loss = (value * mask).sum() / mask.sum().clamp(min=1)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0 and torch.isfinite(grad).all() and grad.abs().max() == 0


@pytest.mark.parametrize(("kind", "beta", "alpha"), VARIANTS, ids=VARIANT_IDS)
def test_shift_invariance(kind, beta, alpha):
    s, t = make_logits((4, 7), 10, torch.float32), make_logits((4, 7), 11, torch.float32)
    a = divergence(kind, *dense_support(s, t, 7), beta=beta, alpha=alpha)
    b = divergence(kind, *dense_support(s + 3.0, t - 2.0, 7), beta=beta, alpha=alpha)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "beta", "alpha"), VARIANTS, ids=VARIANT_IDS)
def test_micro_batch_grads_sum_to_full_batch(kind, beta, alpha):
    s = make_logits((4, 5, 9), 12, torch.float32).requires_grad_()
    t = make_logits((4, 5, 9), 13, torch.float32)
    mask = (torch.arange(20).reshape(4, 5) % 3 != 0).float()
    n_tokens = mask.sum()  # target tokens of the whole optimizer step

    def loss(rows: slice) -> torch.Tensor:
        value = divergence(kind, *dense_support(s[rows], t[rows], 9), beta=beta, alpha=alpha)
        return (value * mask[rows]).sum() / n_tokens

    (full,) = torch.autograd.grad(loss(slice(0, 4)), s)
    parts = sum(torch.autograd.grad(loss(slice(i, i + 2)), s)[0] for i in (0, 2))
    torch.testing.assert_close(parts, full, atol=1e-6, rtol=0)


logit_rows = st.lists(st.floats(-8, 8, allow_nan=False), min_size=5, max_size=5)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(logit_rows, min_size=1, max_size=3),
    st.lists(logit_rows, min_size=3, max_size=3),
    st.sampled_from(VARIANTS),
    st.integers(1, 5),
)
def test_nonnegative_and_zero_at_equality(s_rows, t_rows, variant, k):
    kind, beta, alpha = variant
    n = len(s_rows)
    s, t = torch.tensor(s_rows), torch.tensor(t_rows[:n])
    ids = torch.argsort(t, -1, descending=True)[:, :k]
    for student in (s, t):
        dense = divergence(kind, *dense_support(student, t, 5), beta=beta, alpha=alpha)
        lp = torch.log_softmax(t, -1).gather(-1, ids)
        top = divergence(kind, *topk_support(student, ids, lp, 5), beta=beta, alpha=alpha)
        assert (dense >= -1e-6).all() and (top >= -1e-6).all()
        if student is t:
            assert dense.abs().max() < 1e-5 and top.abs().max() < 1e-5


ESTIMATOR_KINDS: list[Estimator] = ["k1", "k2", "k3"]


def test_estimators_expectations_and_gradients():
    """Exact expectations over x ~ p_s: k1 and k3 are unbiased for KL(p_s‖p_t); as losses,
    k1's gradient averages 0, k2's to ∇KL(p_s‖p_t) and k3's to ∇KL(p_t‖p_s)."""
    z = make_logits((7,), 14, torch.float64).requires_grad_()
    log_t = torch.log_softmax(make_logits((7,), 15, torch.float64), -1)
    log_s = torch.log_softmax(z, -1)
    q = log_s.exp().detach()  # sampling weights are fixed: the samples are data
    rkl = (log_s.exp() * (log_s - log_t)).sum()
    fkl = (log_t.exp() * (log_t - log_s)).sum()
    expect = {
        kind: (q * estimator(kind, log_s.double(), log_t).double()) for kind in ESTIMATOR_KINDS
    }
    assert expect["k1"].sum().item() == pytest.approx(rkl.item(), rel=1e-6)
    assert expect["k3"].sum().item() == pytest.approx(rkl.item(), rel=1e-6)
    grads = {
        kind: torch.autograd.grad(v.sum(), z, retain_graph=True)[0] for kind, v in expect.items()
    }
    (g_rkl,) = torch.autograd.grad(rkl, z, retain_graph=True)
    (g_fkl,) = torch.autograd.grad(fkl, z)
    torch.testing.assert_close(grads["k1"], torch.zeros_like(z), atol=1e-6, rtol=0)
    torch.testing.assert_close(grads["k2"], g_rkl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["k3"], g_fkl, rtol=1e-5, atol=1e-6)


def test_k3_nonnegative_and_sampled_logprobs():
    s = make_logits((2, 3, 6), 16, torch.float32)
    tokens = torch.tensor([[0, 4, -1], [2, 2, 3]])
    log_s_x = sampled_logprobs(s, tokens, 5)  # (B, T); vocabulary is 5 of 6 rows
    ref = torch.log_softmax(s[..., :5], -1)
    assert log_s_x[0, 2] == 0 and log_s_x[1, 0] == ref[1, 0, 2]
    assert (estimator("k3", log_s_x, log_s_x - 2.0) >= 0).all()
    with pytest.raises(ValueError, match="padded head row"):
        sampled_logprobs(s, torch.full((2, 3), 5), 5)


def test_vocab_hygiene_errors():
    a = {"a": 0, "b": 1, "<think>": 2}
    assert shared_vocab_size(a, dict(a)) == 3
    with pytest.raises(ValueError, match="tokenizers differ"):
        shared_vocab_size(a, {"a": 0, "b": 1})
    with pytest.raises(ValueError, match="tokenizers differ"):
        shared_vocab_size(a, {"a": 0, "b": 2, "<think>": 1})
    with pytest.raises(ValueError, match="student head has 6 rows"):
        dense_support(torch.zeros(2, 6), torch.zeros(2, 9), 7)
    with pytest.raises(ValueError, match="teacher head"):
        dense_support(torch.zeros(2, 9), torch.zeros(2, 6), 7)
