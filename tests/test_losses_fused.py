"""The chunked fused-linear path against the unchunked one: values and gradients, every form.

Run: pytest tests/test_losses_fused.py -q
"""

import pytest
import torch

from losses import (
    TeacherData,
    TeacherHidden,
    TeacherLogits,
    TeacherSampled,
    TeacherTopK,
    dense_support,
    divergence,
    estimator,
    fused,
    fused_linear_divergence,
    fused_linear_divergence_sum,
    sampled_logprobs,
    topk_support,
)
from losses import logits as logits_module
from losses.logits import fp32_out_matmul, logits_into, matmul_out_dtype
from losses.workspace import Workspace
from tests.test_losses import VARIANT_IDS, VARIANTS

N, H, V, V_S, V_T, K = 13, 8, 11, 14, 16, 5  # odd sizes; both heads carry padded rows
FORMS = ["hidden", "logits", "topk"]


def setup(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {
        "h": torch.randn(N, H, generator=g),
        "w": torch.randn(V_S, H, generator=g) * 0.7,
        "ht": torch.randn(N, H, generator=g),
        "wt": torch.randn(V_T, H, generator=g) * 0.7,
    }
    x = {k: v.to(dtype) for k, v in x.items()}
    teacher_log = torch.log_softmax((x["ht"] @ x["wt"].T).float(), -1)  # over the full head
    x["ids"] = torch.argsort(teacher_log, -1, descending=True)[:, :K]  # may hold padded rows
    x["ids"][0, 2] = -1
    x["lp"] = teacher_log.gather(-1, x["ids"].clamp(min=0))
    x["tokens"] = torch.randint(0, V, (N,), generator=g)
    x["tokens"][3] = -1  # a padding position
    x["tlp"] = teacher_log.gather(-1, x["tokens"].clamp(min=0)[:, None]).squeeze(-1)
    return x


def teacher_data(form: str, x: dict[str, torch.Tensor]) -> TeacherData:
    if form == "hidden":
        return TeacherHidden(x["ht"], x["wt"])
    if form == "logits":
        return TeacherLogits(x["ht"] @ x["wt"].T)
    if form == "topk":
        return TeacherTopK(x["ids"], x["lp"])
    return TeacherSampled(x["tokens"], x["tlp"])


def unchunked(form: str, kind: str, x: dict[str, torch.Tensor], h, w, beta, alpha):
    """The plain path: full logits, then the support, then the divergence."""
    logits = h @ w.T  # (N, V_s)
    if form in ("hidden", "logits"):
        sup = dense_support(logits, x["ht"] @ x["wt"].T, V)
        return divergence(kind, *sup, beta=beta, alpha=alpha)  # type: ignore[arg-type]
    if form == "topk":
        sup = topk_support(logits, x["ids"], x["lp"], V)
        return divergence(kind, *sup, beta=beta, alpha=alpha)  # type: ignore[arg-type]
    values = estimator(kind, sampled_logprobs(logits, x["tokens"], V), x["tlp"])  # type: ignore[arg-type]
    return torch.where(x["tokens"] >= 0, values, 0.0)


def grads_of(loss: torch.Tensor, h: torch.Tensor, w: torch.Tensor):
    return torch.autograd.grad(loss, (h, w))


CASES = [(f, k, b, a) for f in FORMS for k, b, a in VARIANTS] + [
    ("sampled", e, 0.5, 0.1) for e in ("k1", "k2", "k3")
]
CASE_IDS = [f"{f}-{i}" for f in FORMS for i in VARIANT_IDS] + [
    "sampled-k1",
    "sampled-k2",
    "sampled-k3",
]


@pytest.mark.parametrize(("form", "kind", "beta", "alpha"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("chunk_size", [1, 4, N])
def test_fused_matches_unchunked_fp32(form, kind, beta, alpha, chunk_size):
    x = setup(torch.float32)
    h, w = x["h"].requires_grad_(), x["w"].requires_grad_()
    ref = unchunked(form, kind, x, h, w, beta, alpha)  # (N,)
    upstream = torch.linspace(-0.5, 1.5, N)  # any per-token gradient, masks included
    ref_gh, ref_gw = grads_of((ref * upstream).sum(), h, w)
    teacher = teacher_data(form, x)
    opts = {"vocab_size": V, "beta": beta, "alpha": alpha, "chunk_size": chunk_size}
    values = fused_linear_divergence(h, w, teacher, kind, **opts)
    torch.testing.assert_close(values, ref.detach(), rtol=1e-5, atol=1e-6)
    gh, gw = grads_of((values * upstream).sum(), h, w)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-6)
    assert gw[V:].abs().max() == 0  # padded rows of the student head
    loss, per_token = fused_linear_divergence_sum(h, w, teacher, kind, upstream, **opts)
    torch.testing.assert_close(per_token, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, (ref * upstream).sum().detach(), rtol=1e-5, atol=1e-6)
    gh, gw = grads_of(loss * 2.0, h, w)  # a non-unit upstream gradient on the scalar
    torch.testing.assert_close(gh, 2 * ref_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, 2 * ref_gw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("form", [*FORMS, "sampled"])
def test_fused_bf16_close_to_unchunked_fp32(form):
    kind = "k3" if form == "sampled" else "jsd"
    x16 = setup(torch.bfloat16)
    x32 = {k: (v.float() if v.is_floating_point() else v) for k, v in x16.items()}
    h32, w32 = x32["h"].requires_grad_(), x32["w"].requires_grad_()
    ref = unchunked(form, kind, x32, h32, w32, 0.5, 0.1)
    ref_gh, ref_gw = grads_of(ref.sum(), h32, w32)
    h, w = x16["h"].requires_grad_(), x16["w"].requires_grad_()
    loss, values = fused_linear_divergence_sum(
        h, w, teacher_data(form, x16), kind, torch.ones(N), vocab_size=V, chunk_size=4
    )
    gh, gw = grads_of(loss, h, w)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # bf16 logits (the matmul's output) and bf16 gradients: a few 2^-8 relative
    torch.testing.assert_close(values, ref.detach(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(gh.float(), ref_gh, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gw.float(), ref_gw, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("form", [*FORMS, "sampled"])
def test_micro_batches_sum_to_full_batch(form):
    kind = "k2" if form == "sampled" else "reverse_kl"
    x = setup(torch.float32, seed=1)
    h, w = x["h"].requires_grad_(), x["w"].requires_grad_()
    mask = (torch.arange(N) % 4 != 1).float()
    n_tokens = mask.sum()  # of the whole optimizer step
    teacher = teacher_data(form, x)
    loss, _ = fused_linear_divergence_sum(h, w, teacher, kind, mask / n_tokens, vocab_size=V)
    full = grads_of(loss, h, w)
    parts = [torch.zeros_like(h), torch.zeros_like(w)]
    for rows in (slice(0, 6), slice(6, N)):
        sub = {k: v[rows] if k not in ("w", "wt") else v for k, v in x.items()}
        part, _ = fused_linear_divergence_sum(
            h[rows], w, teacher_data(form, sub), kind, mask[rows] / n_tokens, vocab_size=V
        )
        for acc, g in zip(parts, grads_of(part, h, w), strict=True):
            acc += g
    for got, want in zip(parts, full, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("form", [*FORMS, "sampled"])
def test_all_masked_gives_zero_not_nan(form):
    kind = "k3" if form == "sampled" else "skew_rkl"
    x = setup(torch.float32, seed=2)
    h, w = x["h"].requires_grad_(), x["w"].requires_grad_()
    mask = torch.zeros(N)
    loss, _ = fused_linear_divergence_sum(
        h, w, teacher_data(form, x), kind, mask / mask.sum().clamp(min=1), vocab_size=V
    )
    gh, gw = grads_of(loss, h, w)
    assert loss.item() == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_batched_shapes_and_errors():
    x = setup(torch.float32)
    h = x["h"][:12].reshape(3, 4, H)
    topk = TeacherTopK(x["ids"][:12].reshape(3, 4, K), x["lp"][:12].reshape(3, 4, K))
    values = fused_linear_divergence(h, x["w"], topk, "forward_kl", vocab_size=V)
    assert values.shape == (3, 4)
    with pytest.raises(ValueError, match="sampled-token"):
        fused_linear_divergence(x["h"], x["w"], teacher_data("sampled", x), "jsd", vocab_size=V)
    with pytest.raises(ValueError, match="not a divergence"):
        fused_linear_divergence(x["h"], x["w"], topk, "k1", vocab_size=V)
    with pytest.raises(ValueError, match="padded head row"):
        bad = TeacherSampled(torch.full((N,), V), x["tlp"])
        fused_linear_divergence(x["h"], x["w"], bad, "k1", vocab_size=V)
    with pytest.raises(ValueError, match="teacher head has"):
        fused_linear_divergence(x["h"], x["w"], TeacherLogits(torch.zeros(N, V - 1)), "jsd",
                                vocab_size=V)  # fmt: skip
    with pytest.raises(ValueError, match="positions"):
        fused_linear_divergence(x["h"], x["w"], topk, "jsd", vocab_size=V)


@pytest.fixture(scope="module")
def inductor() -> None:
    """Skip (with the reason) where torch.compile's CPU backend cannot build its C++ kernels."""
    try:
        torch.compile(lambda t: t.exp() + 1, dynamic=False)(torch.ones(3))
    except Exception as error:  # noqa: BLE001 - any build failure means "cannot test here"
        pytest.skip(f"inductor cannot compile on this machine: {type(error).__name__}: {error}")


@pytest.mark.parametrize(
    ("form", "kind"), [("hidden", "jsd"), ("topk", "skew_rkl"), ("sampled", "k3")]
)
def test_compiled_chunks_equal_eager(inductor, form, kind):
    """compile=True runs the same kernels through torch.compile: same values and gradients."""
    x = setup(torch.float32, seed=3)  # fp32: a difference is a bug, not a bf16 rounding flip
    upstream = torch.linspace(-0.5, 1.5, N)
    results = []
    for compile in (False, True):
        h, w = x["h"].clone().requires_grad_(), x["w"].clone().requires_grad_()
        opts = {"vocab_size": V, "chunk_size": 16, "compile": compile}
        loss, values = fused_linear_divergence_sum(
            h, w, teacher_data(form, x), kind, upstream, **opts
        )
        per_token = fused_linear_divergence(h.detach(), w.detach(), teacher_data(form, x), kind,
                                            **opts)  # fmt: skip
        results.append((loss.detach(), values, per_token, *grads_of(loss, h, w)))
    for eager, compiled in zip(*results, strict=True):
        # fp32 math in both; inductor may reorder a sum or fuse a multiply-add
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("form", [*FORMS, "sampled"])
def test_row_blocks_inside_a_chunk_match_unchunked(monkeypatch, form, compile):
    """CPU runs each chunk's math in blocks of rows; blocks that split a chunk unevenly agree.

    Compiled, the dense forms take the CPU's C++ kernel over whole chunks (7, then 6 rows).
    """
    monkeypatch.setattr(fused, "CPU_BLOCK_ROWS", 3)  # chunk 7 -> blocks of 3, 3, 1; tail 6 -> 3, 3
    kind = "k3" if form == "sampled" else "jsd"
    x = setup(torch.float32, seed=4)
    h, w = x["h"].requires_grad_(), x["w"].requires_grad_()
    ref = unchunked(form, kind, x, h, w, 0.5, 0.1)
    ref_gh, ref_gw = grads_of(ref.sum(), h, w)
    loss, values = fused_linear_divergence_sum(
        h, w, teacher_data(form, x), kind, torch.ones(N), vocab_size=V, chunk_size=7,
        compile=compile,
    )  # fmt: skip
    gh, gw = grads_of(loss, h, w)
    torch.testing.assert_close(values, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-6)


@pytest.fixture
def no_mkl(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU PyTorch without MKL's fp32-out GEMM (aarch64 builds, or MKL left out)."""
    monkeypatch.setattr(logits_module, "_mkl_gemm", lambda dtype: None)


def test_matmul_out_dtype_and_fp32_output_call(no_mkl: None) -> None:
    """bf16 logits on a CPU without the fp32-out GEMM; fp32 on CUDA, via mm's out_dtype."""
    assert matmul_out_dtype(torch.zeros(2, 2, dtype=torch.bfloat16)) == torch.bfloat16
    assert matmul_out_dtype(torch.zeros(2, 2)) == torch.float32
    # The CUDA call, checked for signature and shapes on the meta device (no kernel runs).
    h = torch.empty(5, 8, dtype=torch.bfloat16, device="meta")
    w = torch.empty(11, 8, dtype=torch.bfloat16, device="meta")
    out = torch.empty(5, 11, dtype=torch.float32, device="meta")
    logits = logits_into(h, w, out)
    assert logits.dtype == torch.float32 and logits.shape == (5, 11)


def test_workspace_reuses_buffers_and_changes_nothing():
    """A kept Workspace gives the same loss and gradients, holding its buffers between calls."""
    x = setup(torch.float32, seed=6)
    workspace = Workspace()

    def step(ws: Workspace | None) -> tuple[torch.Tensor, ...]:
        h, w = x["h"].clone().requires_grad_(), x["w"].clone().requires_grad_()
        loss, values = fused_linear_divergence_sum(
            h, w, teacher_data("hidden", x), "jsd", torch.ones(N), vocab_size=V, chunk_size=5,
            compile=True, workspace=ws,
        )  # fmt: skip
        return (loss.detach(), values, *grads_of(loss, h, w))

    fresh = step(None)
    first = step(workspace)
    held = {name: b.data_ptr() for name, b in workspace._buffers.items()}
    second = step(workspace)
    for again in (first, second):
        for a, b in zip(fresh, again, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert {name: b.data_ptr() for name, b in workspace._buffers.items()} == held
    assert set(held) == {"zs", "zt", "dz"}
    assert workspace.nbytes == 3 * 5 * V * 4  # fp32 chunk buffers


def test_workspace_buffer_is_remade_when_it_does_not_fit():
    workspace = Workspace()
    like = torch.zeros(1)
    small = workspace.get("zs", 4, 10, like, torch.float32)
    assert workspace.get("zs", 3, 10, like, torch.float32).data_ptr() == small.data_ptr()
    bigger = workspace.get("zs", 6, 10, like, torch.float32)  # more rows: remade
    assert bigger.shape == (6, 10) and workspace.nbytes == 6 * 10 * 4
    assert workspace.get("zs", 6, 10, like, torch.bfloat16).dtype == torch.bfloat16
    assert workspace.get("zs", 6, 12, like, torch.bfloat16).shape == (6, 12)  # another vocab
    assert workspace.nbytes == 6 * 12 * 2  # one buffer per name, the old one released


@pytest.mark.skipif(
    logits_module._mkl_gemm(torch.bfloat16) is None, reason="no MKL, or a CPU without AMX"
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_fp32_logits_from_mkl_are_exact_for_any_layout(dtype: torch.dtype) -> None:
    """MKL's 16-bit-in, fp32-out GEMM: logits as exact as an fp32 matmul of the same inputs, for
    strided views (a row slice of a wider buffer, a transposed hidden state), one row, no rows."""
    g = torch.Generator().manual_seed(11)
    h = torch.randn(16, 256, generator=g).to(dtype)
    w = (torch.randn(310, 256, generator=g) * 0.2).to(dtype)
    assert fp32_out_matmul(h) and matmul_out_dtype(h) == torch.float32
    exact = h.double() @ w[:300].double().T  # (16, 300)
    scale = exact.abs().max()
    plain = logits_into(h, w[:300], torch.empty(16, 300))
    assert (plain.double() - exact).abs().max() / scale < 2e-6
    wide = torch.full((16, 400), float("nan"))  # out: a column slice, rows 400 apart
    strided = logits_into(h.T.contiguous().T, w[:300], wide[:, 50:350])
    torch.testing.assert_close(strided, plain, rtol=0, atol=0)
    assert wide[:, :50].isnan().all() and wide[:, 350:].isnan().all()  # nothing written outside
    torch.testing.assert_close(logits_into(h[3:4], w[:300], torch.empty(1, 300)), plain[3:4])
    assert logits_into(h[:0], w[:300], torch.empty(0, 300)).shape == (0, 300)


def test_exact_logits_from_two_bf16_matmuls(no_mkl: None) -> None:
    """hi + lo from two bf16 matmuls is as close to the exact logits as an fp32 matmul is."""
    g = torch.Generator().manual_seed(7)
    h = torch.randn(16, 256, generator=g).bfloat16()
    w = (torch.randn(300, 256, generator=g) * 0.2).bfloat16()
    exact = h.double() @ w.double().T  # (16, 300)
    assert matmul_out_dtype(h, exact_logits=True) == torch.float32
    out, residual = torch.empty(16, 300), torch.empty(16, 300, dtype=torch.bfloat16)
    two_term = logits_into(h, w, out, residual)
    one_term = logits_into(h, w, torch.empty(16, 300, dtype=torch.bfloat16))
    scale = exact.abs().max()
    assert (two_term.double() - exact).abs().max() / scale < 2e-5
    assert (one_term.double() - exact).abs().max() / scale > 5e-4  # one bf16 rounding


@pytest.mark.parametrize("mkl", [False, True])
def test_exact_logits_loss_matches_fp32_reference(mkl: bool, monkeypatch: pytest.MonkeyPatch):
    """bf16 inputs: fp32 logits (MKL's GEMM by default, else exact_logits' two matmuls) bring the
    loss from bf16-logit error to fp32-level error."""
    if not mkl:
        monkeypatch.setattr(logits_module, "_mkl_gemm", lambda dtype: None)
    elif logits_module._mkl_gemm(torch.bfloat16) is None:
        pytest.skip("no MKL, or a CPU without AMX")
    g = torch.Generator().manual_seed(8)
    n, hidden, vocab = 24, 128, 3000
    hs = torch.randn(n, hidden, generator=g).bfloat16()
    ws = (torch.randn(vocab, hidden, generator=g) * 3 / hidden**0.5).bfloat16()
    ht = (hs.float() + 0.5 * torch.randn(n, hidden, generator=g)).bfloat16()
    wt = (ws.float() + 1.5 / hidden**0.5 * torch.randn(vocab, hidden, generator=g)).bfloat16()
    log_s = torch.log_softmax(hs.double() @ ws.double().T, -1)
    log_t = torch.log_softmax(ht.double() @ wt.double().T, -1)
    reference = divergence("jsd", log_s, log_t).mean()  # fp64 from the same bf16 inputs
    errors = {}
    for exact in (False, True):
        loss, _ = fused_linear_divergence_sum(
            hs, ws, TeacherHidden(ht, wt), "jsd", torch.full((n,), 1 / n), vocab_size=vocab,
            chunk_size=10, exact_logits=exact,
        )  # fmt: skip
        errors[exact] = abs(loss.item() - reference.item()) / reference.item()
    if mkl:  # fp32 logits either way: exact_logits adds nothing
        assert errors[False] < 1e-5 and errors[True] == errors[False]
    else:
        assert errors[True] < 1e-5 < errors[False]


def test_exact_logits_with_teacher_and_student_in_different_dtypes():
    """Each side gets its own residual (or none): fp32 student, bf16 teacher, and the reverse."""
    x = setup(torch.float32, seed=10)
    for s_dtype, t_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        h, w = x["h"].to(s_dtype), x["w"].to(s_dtype)
        teacher = TeacherHidden(x["ht"].to(t_dtype), x["wt"].to(t_dtype))
        values = fused_linear_divergence(h, w, teacher, "jsd", vocab_size=V, exact_logits=True)
        log_s = torch.log_softmax(h.double() @ w.double()[:V].T, -1)
        log_t = torch.log_softmax(teacher.hidden.double() @ teacher.weight.double()[:V].T, -1)
        reference = divergence("jsd", log_s, log_t)
        torch.testing.assert_close(values.double(), reference, rtol=1e-5, atol=1e-6)
