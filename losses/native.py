"""The CPU kernel of the dense teacher forms, `losses/dense_cpu.cpp`, built on first use.

On CPU the dense forms' fp32 math (two softmaxes over V = 151,936 per row, a divergence, its
logit gradient) costs more than it should under torch.compile: inductor runs a block of rows
pass after pass, and a block that keeps its threads busy no longer fits in cache, so every pass
streams from memory. The C++ kernel takes one row per thread through all its passes while the
row sits in L2/L3, and takes every log-ratio where it is well conditioned (see the .cpp).
Measured on 2 cores, 256 rows of JSD at V = 151,936: 47 ms compiled, 34 ms here; forward KL
21 ms. Per row it matches an fp64 reference to ~3e-7 relative, against ~2e-5 for the fp32
torch formulas (`losses.chunk.dense_chunk`), whose log-probabilities carry a rounding that is
the same across each binade of bf16 logits.

The fused path uses it on CPU when `compile=True` (a C++ compiler is needed either way). It is
built by `torch.utils.cpp_extension` for the vector ISA PyTorch runs with (AVX512, AVX2, or
plain C++), once per machine (~20 s; then cached under torch's extensions directory,
`TORCH_EXTENSIONS_DIR` to move it).
"""

import functools
import re
from pathlib import Path
from types import ModuleType

import torch

from losses.divergences import Divergence, at_family_end

SOURCE = Path(__file__).with_name("dense_cpu.cpp")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernel reads and writes
# The kernel's divergence codes (enum Kind in the .cpp).
_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_fkl": 3, "skew_rkl": 4, "tvd": 5}
# Compiler flags per PyTorch CPU capability: the same ISA macros ATen's own kernels and
# inductor's generated code use, so at::vec picks its AVX512 / AVX2 implementation.
_ISA = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}  # fmt: skip


def isa() -> str:
    """The vector ISA the kernel is built for: AVX512, AVX2, or DEFAULT (plain C++)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return next((name for name in _ISA if capability.startswith(name)), "DEFAULT")


@functools.cache
def extension() -> ModuleType:
    """The build for this machine's ISA (compiled on the first call in its life, then loaded)."""
    return build(isa())


def build(target: str) -> ModuleType:
    """Build (or load the cached build of) the kernel for one ISA: AVX512, AVX2 or DEFAULT."""
    from torch.utils import cpp_extension

    # torch's extension cache keys builds by source and flags, not by torch version: the version
    # goes into the name, so an upgraded torch builds anew instead of loading a stale ABI.
    version = re.sub(r"\W", "_", torch.__version__)
    # -ffp-contract=off: no fused multiply-adds the source did not write. GCC contracts by
    # default, and then q - p for identical rows is fma(e, s, -p), one product's rounding
    # instead of 0: TVD and the skews would not be 0 at student == teacher.
    try:
        module = cpp_extension.load(
            name=f"distill_dense_cpu_{target.lower()}_torch{version}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp", *_ISA.get(target, [])],
            extra_ldflags=["-fopenmp"],
        )
    except (OSError, RuntimeError, ImportError) as error:
        raise RuntimeError(
            f"could not build the CPU loss kernel {SOURCE.name} ({error}). It needs a C++ "
            "compiler with OpenMP (g++) and ninja (pip install ninja), as torch.compile does on "
            "CPU; or pass compile=False to run the dense forms as eager torch"
        ) from error
    assert isinstance(module, ModuleType)  # load() returns a path only with is_python_module=False
    return module


def code(kind: Divergence, beta: float, alpha: float) -> tuple[int, float]:
    """(the kernel's divergence code, its mixture weight) for kind with β / α.

    The ends of the families run as plain KLs (`losses.divergences.at_family_end`).
    """
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if kind in ("skew_fkl", "skew_rkl") and not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    plain = at_family_end(kind, beta, alpha)
    mix = {"jsd": beta, "skew_fkl": alpha, "skew_rkl": alpha}.get(plain, 0.0)
    return _CODES[plain], mix


def dense_rows(
    zs: torch.Tensor,
    zt: torch.Tensor,
    weight: torch.Tensor | None,
    out: torch.Tensor | None,
    kind: Divergence,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """`losses.chunk.dense_chunk` in C++: zs, zt (R, V) logits -> values (R,) fp32.

    With weight (R,) and out (R, V), also writes dz = ∂(Σ w·D)/∂zs into out, in out's dtype.
    Logits and out are fp32, bf16 or fp16 (`DTYPES`), on CPU; rows may be strided (a slice of
    a wider head), entries within a row are made contiguous if they are not.
    """
    number, mix = code(kind, beta, alpha)
    zs = zs if zs.stride(-1) == 1 else zs.contiguous()
    zt = zt if zt.stride(-1) == 1 else zt.contiguous()
    if weight is None or out is None:
        weight, out = None, None  # values only
    else:
        assert out.stride(-1) == 1, "dz buffers are row-major slices"
    return extension().dense_rows(zs, zt, weight, out, number, mix)
