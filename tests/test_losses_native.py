"""The CPU C++ kernel of the dense forms (`losses.native`) against fp64 definitions.

Run: pytest tests/test_losses_native.py -q
"""

import shutil

import pytest
import torch
from torch.utils import cpp_extension

from losses import native
from tests.test_losses import VARIANT_IDS, VARIANTS, reference

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler on PATH: the native kernel cannot be built here",
)


def logits(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) fp32 logits (rows, vocab) with the cases that bite on some rows."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(rows, vocab, generator=g) * 3
    zt = zs + torch.randn(rows, vocab, generator=g)
    zt[1] = zs[1]  # student == teacher: D = 0 and dz = 0
    zs[2, :5] = zt[2, :5] = float("-inf")  # no mass on either side: a masked vocabulary range
    zs[3, -4:] = zt[3, -4:] = float("-inf")  # the same at the row's tail
    zs[4], zt[4] = zs[4] * 12, zt[4] * 12  # spread past exp's range: probabilities underflow
    return zs, zt


def exact(
    zs: torch.Tensor, zt: torch.Tensor, weight: torch.Tensor, kind: str, beta: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (R,), dz (R, V)) in fp64 from the definitions, dz by autograd.

    Row by row over the ids with mass (-inf on both sides carries none, and its gradient is 0):
    autograd through a 0 * log 0 term would give NaN for the whole row.
    """
    values = torch.zeros(len(zs), dtype=torch.float64)
    dz = torch.zeros_like(zs, dtype=torch.float64)
    for r in range(len(zs)):
        live = zs[r].isfinite()
        z = zs[r, live].double().requires_grad_()
        q, p = torch.softmax(z, -1), torch.softmax(zt[r, live].double(), -1)
        value = reference(kind, q, p, beta, alpha)
        (grad,) = torch.autograd.grad(value * float(weight[r]), z)
        values[r], dz[r, live] = value.detach(), grad
    return values, dz


@pytest.mark.parametrize("vocab", [40, 101], ids=["whole-vectors", "ragged-tail"])
@pytest.mark.parametrize(("kind", "beta", "alpha"), VARIANTS, ids=VARIANT_IDS)
def test_values_and_logit_gradients_match_fp64(kind, beta, alpha, vocab):
    zs, zt = logits(6, vocab, seed=3)
    weight = torch.linspace(0.2, 1.0, 6)
    dz = torch.empty(6, vocab)
    values = native.dense_rows(zs, zt, weight, dz, kind, beta, alpha)
    want, want_dz = exact(zs, zt, weight, kind, beta, alpha)
    torch.testing.assert_close(values.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz.double(), want_dz, rtol=1e-4, atol=1e-7)
    assert abs(values[1].item()) < 1e-6 and dz[1].abs().max().item() < 1e-7
    values_only = native.dense_rows(zs, zt, None, None, kind, beta, alpha)
    torch.testing.assert_close(values_only, values, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("s_dtype", "t_dtype", "out_dtype"),
    [
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # the fused path on CPU
        (torch.float32, torch.bfloat16, torch.bfloat16),  # exact_logits student, bf16 teacher
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float16, torch.float16, torch.float16),
    ],
    ids=["bf16", "fp32-student", "fp32-teacher", "fp16"],
)
def test_dtypes_read_as_given_and_dz_rounded_once(s_dtype, t_dtype, out_dtype):
    zs, zt = logits(6, 101, seed=4)
    zs, zt = zs.to(s_dtype), zt.to(t_dtype)
    weight = torch.full((6,), 0.5)
    dz = torch.empty(6, 101, dtype=out_dtype)
    values = native.dense_rows(zs, zt, weight, dz, "jsd", 0.5, 0.1)
    want, want_dz = exact(zs.float(), zt.float(), weight, "jsd", 0.5, 0.1)
    torch.testing.assert_close(values.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz, want_dz.to(out_dtype), rtol=1e-2, atol=1e-6)


def test_strided_rows_of_a_wider_head():
    """Rows cut from (R, V_head) logits (a padded head) read only their first V entries."""
    zs, zt = logits(5, 64, seed=5)
    wide = torch.full((5, 70), 50.0)  # padded columns that would dominate a softmax
    wide[:, :64] = zt
    dz, dz_wide = torch.empty(5, 64), torch.full((5, 70), 7.0)
    weight = torch.ones(5)
    a = native.dense_rows(zs, zt, weight, dz, "reverse_kl", 0.5, 0.1)
    b = native.dense_rows(zs, wide[:, :64], weight, dz_wide[:, :64], "reverse_kl", 0.5, 0.1)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(dz_wide[:, :64], dz, rtol=0, atol=0)
    assert bool((dz_wide[:, 64:] == 7.0).all())  # nothing written past the row


def test_unbiased_over_qwen3_wide_bf16_rows():
    """Log-ratios, not log-probabilities: bf16 logits leave no per-row bias (eager fp32: 2e-5)."""
    g = torch.Generator().manual_seed(11)
    zs = (torch.randn(8, 151_936, generator=g) * 3).bfloat16()
    zt = (zs.float() + torch.randn(8, 151_936, generator=g)).bfloat16()
    for kind, beta in (("jsd", 0.5), ("forward_kl", 0.5)):
        values = native.dense_rows(zs, zt, None, None, kind, beta, 0.1).double()
        want = reference(kind, torch.softmax(zs.double(), -1), torch.softmax(zt.double(), -1),
                         beta, 0.1)  # fmt: skip
        assert ((values - want).abs() / want).max().item() < 2e-6  # measured ~3e-7


def test_a_failed_build_names_the_fix(monkeypatch):
    def no_compiler(**_: object) -> None:
        raise RuntimeError("Error building extension")

    native.extension.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    try:
        with pytest.raises(RuntimeError, match="compile=False"):
            native.extension()
    finally:
        native.extension.cache_clear()  # the next call loads the real (cached) build


def test_ends_of_the_families_are_the_plain_kls():
    assert native.code("jsd", 0.0, 0.1) == native.code("forward_kl", 0.5, 0.1)
    assert native.code("jsd", 1.0, 0.1) == native.code("reverse_kl", 0.5, 0.1)
    assert native.code("skew_rkl", 0.5, 0.0) == native.code("reverse_kl", 0.5, 0.1)
    with pytest.raises(ValueError, match="beta"):
        native.code("jsd", 1.5, 0.1)


@pytest.mark.parametrize("target", ["AVX2", "DEFAULT"])
def test_narrower_isa_builds_agree(target):
    """The AVX2 and plain-C++ builds (what older x86 and other CPUs get) give the same numbers."""
    if target == "AVX2" and native.isa() not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU runs {native.isa()}, not AVX2")
    other = native.build(target)
    zs, zt = logits(6, 101, seed=7)
    zs = zs.bfloat16()  # the bf16 load path as well as the fp32 one
    weight = torch.linspace(0.2, 1.0, 6)
    for kind, beta, alpha in (("jsd", 0.3, 0.1), ("skew_rkl", 0.5, 0.25), ("tvd", 0.5, 0.1)):
        number, mix = native.code(kind, beta, alpha)
        dz, dz_other = torch.empty(6, 101), torch.empty(6, 101)
        values = native.dense_rows(zs, zt, weight, dz, kind, beta, alpha)
        values_other = other.dense_rows(zs, zt, weight, dz_other, number, mix)
        torch.testing.assert_close(values_other, values, rtol=1e-5, atol=1e-7)  # sum order
        torch.testing.assert_close(dz_other, dz, rtol=1e-5, atol=1e-7)
