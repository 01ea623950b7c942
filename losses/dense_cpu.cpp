// The CPU kernel of the dense teacher forms: one row of (student, teacher) logits per thread at a
// time, every pass over that row while it sits in cache. Built by `losses.native` (torch's
// cpp_extension); the values and gradients are those of `losses.gradients.value_and_grad`, and
// tests/test_losses_native.py holds them to fp64 definitions for every divergence.
//
// Why by hand: under torch.compile the same math ran pass after pass over a block of 32 rows
// (58 MB of logits and exponentials, more than the L3), at the memory's speed (~40 GB/s on 2
// cores). Here a thread's row lives in fp32 scratch of 4 x V floats (2.4 MB at V = 151,936: L2
// and L3), and DRAM sees each logit read once and each gradient written once.
//
// Per row, with a = student logits, b = teacher logits, clamped to >= NEG (-1e30) so that -inf is
// an exact zero probability, in blocks of BLOCK entries:
//   1. per block: a, b -> scratch, the block's max, e = exp(x - block max) -> scratch, Σ e
//      (the block stays in L1 between the two); then per row, in fp64, the log normaliser and
//      each block's scale exp(block max - row max) / Σ, so that q = e_a * scale_a;
//   2. per block: the divergence's terms and g = ∂D/∂log q (written over b), summed (value, Σg);
//   3. dz = (g - q Σg) · w, the gradient on the student's logits, in out's dtype.
// Rows are padded to a multiple of 2W with NEG (probability exactly 0): no pass has a scalar
// tail. Sums are fp32 within a block (64 terms per lane) and fp64 across blocks.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();
constexpr int64_t BLOCK = 1024;  // entries per fp32 partial sum before it joins the fp64 total
constexpr float NEG = -1e30f;
constexpr float TINY = 1.17549435e-38f;  // smallest normal fp32: the floor of a mixture

// Divergence codes, shared with losses/native.py.
enum Kind : int64_t { FORWARD = 0, REVERSE = 1, JSD = 2, SKEW_FKL = 3, SKEW_RKL = 4, TVD = 5 };

// Loads 2W entries of a row from i on as fp32, the ones at or past v as NEG, -inf as NEG.
template <typename T>
inline void load2(const T* src, int64_t i, int64_t v, Vec& lo, Vec& hi) {
  if (i + 2 * W <= v) {
    if constexpr (std::is_same_v<T, float>) {
      lo = Vec::loadu(src + i);
      hi = Vec::loadu(src + i + W);
    } else {
      std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(src + i));
    }
  } else {
    alignas(64) float tmp[2 * W];
    for (int64_t k = 0; k < 2 * W; ++k) tmp[k] = i + k < v ? static_cast<float>(src[i + k]) : NEG;
    lo = Vec::loadu(tmp);
    hi = Vec::loadu(tmp + W);
  }
  const Vec neg(NEG);
  lo = at::vec::maximum(lo, neg);  // NaN stays NaN
  hi = at::vec::maximum(hi, neg);
}

// Stores 2W fp32 entries as T, only those before v.
template <typename T>
inline void store2(T* dst, int64_t i, int64_t v, const Vec& lo, const Vec& hi) {
  const int64_t n = std::min<int64_t>(2 * W, v - i);
  if constexpr (std::is_same_v<T, float>) {
    lo.store(dst + i, std::min<int64_t>(W, n));
    if (n > W) hi.store(dst + i + W, n - W);
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(dst + i, n);
  }
}

struct Side {
  float* x;  // logits, fp32, clamped to >= NEG; for the teacher, later g
  float* e;  // exp(x - the block's max)
  std::vector<float> top, sum;  // per block: max of x, Σ e
  std::vector<float> scale;     // per block: exp(top - max) / Σ: q = e * scale
  double lse = 0.0;  // the row's log normaliser, log Σ exp(x)

  Side(float* x_, float* e_, int64_t blocks)
      : x(x_), e(e_), top(blocks), sum(blocks), scale(blocks) {}

  // Pass 1 over one block [start, stop): x from src, its max, e = exp(x - max), Σ e.
  template <typename T>
  void load_block(const T* src, int64_t v, int64_t blk, int64_t start, int64_t stop) {
    Vec m(NEG);
    for (int64_t i = start; i < stop; i += 2 * W) {
      Vec lo, hi;
      load2(src, i, v, lo, hi);
      lo.store(x + i);
      hi.store(x + i + W);
      m = at::vec::maximum(m, at::vec::maximum(lo, hi));
    }
    const float t = at::vec::vec_reduce_all<float>(
        [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
    const Vec shift(t);
    Vec acc(0.0f);
    for (int64_t i = start; i < stop; i += W) {
      const Vec ex = (Vec::loadu(x + i) - shift).exp();
      ex.store(e + i);
      acc = acc + ex;
    }
    top[blk] = t;
    sum[blk] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  }

  // After every block: the row's log normaliser and each block's scale, summed in fp64.
  void finish() {
    const float m = *std::max_element(top.begin(), top.end());
    double total = 0.0;
    for (size_t k = 0; k < top.size(); ++k) total += sum[k] * std::exp(double(top[k]) - m);
    lse = m + std::log(total);
    for (size_t k = 0; k < top.size(); ++k)
      scale[k] = static_cast<float>(std::exp(double(top[k]) - m) / total);
  }
};

// Pass 2 for one kind over one block: adds to (value, Σg); writes g over t.x when grad is set.
//
// No log-probability is formed on its own: log q = a - lse_a in fp32 carries a rounding that,
// for bf16 logits (8 significant bits), is the same for every entry in a binade, so it shifts
// the row's value instead of averaging out (~5e-7 absolute, 1e-5 of a JSD of 0.05). What the
// divergences need are differences, taken where they are exact or well conditioned:
//   δ = log p - log q = (b - a) - (lse_b - lse_a): b - a is exact for bf16 logits, and the
//       normalisers' difference is rounded once, in fp64;
//   log(m / q) and log(m / p) = log1p(w (p - q) / q) and its mirror, from the probabilities.
// Entries where the denominator's probability is 0 take their limits (see each case).
template <Kind K>
void value_grad(
    const Side& s, Side& t, int64_t blk, int64_t start, int64_t stop, float coef, bool grad,
    double& value, double& gsum) {
  const Vec d(static_cast<float>(t.lse - s.lse)), ia(s.scale[blk]), ib(t.scale[blk]);
  const Vec c(coef), cc(1.0f - coef), one(1.0f), tiny(TINY), half(0.5f), zero(0.0f);
  const Vec c_log_c(coef > 0.0f ? coef * std::log(coef) : 0.0f);
  Vec vacc(0.0f), gacc(0.0f);
  for (int64_t i = start; i < stop; i += W) {
    const Vec q = Vec::loadu(s.e + i) * ia;
    const Vec p = Vec::loadu(t.e + i) * ib;
    Vec v, g;
    if constexpr (K == FORWARD || K == REVERSE || K == JSD) {
      const Vec delta = (Vec::loadu(t.x + i) - Vec::loadu(s.x + i)) - d;  // log p - log q
      if constexpr (K == FORWARD) {  // Σ p δ; g = -p
        v = p * delta;
        g = zero - p;
      } else if constexpr (K == REVERSE) {  // Σ -q δ; g = q (1 - δ)
        v = zero - q * delta;
        g = q * (one - delta);
      } else {
        // m = β p + (1-β) q, L = log(m / q): D = Σ β p (δ - L) - (1-β) q L = Σ β p δ - m L,
        // g = (1-β) q (log q - log m) = -(1-β) q L. At q = 0: D = β p log(p / m) = -β log β p.
        const Vec live = q > zero;
        const Vec lr = (c * ((p - q) / q)).log1p();
        v = Vec::blendv(zero - c_log_c * p, c * p * delta - (c * p + cc * q) * lr, live);
        g = Vec::blendv(zero, zero - cc * q * lr, live);
      }
    } else if constexpr (K == SKEW_FKL) {
      // m = α p + (1-α) q: D = Σ p log(p / m) = -Σ p log1p((1-α)(q - p) / p), 0 at p = 0;
      // g = -(1-α) p q / m.
      const Vec m = at::vec::maximum(c * p + cc * q, tiny);
      v = Vec::blendv(zero, zero - p * (cc * ((q - p) / p)).log1p(), p > zero);
      g = zero - cc * p * q / m;
    } else if constexpr (K == SKEW_RKL) {
      // m = α q + (1-α) p, L = log(m / q) = log1p((1-α)(p - q) / q): D = -Σ q L,
      // g = q (log q - log m + 1 - α q / m) = q (1 - L - α q / m); both 0 at q = 0.
      const Vec live = q > zero;
      const Vec m = at::vec::maximum(c * q + cc * p, tiny);
      const Vec lr = (cc * ((p - q) / q)).log1p();
      v = Vec::blendv(zero, zero - q * lr, live);
      g = Vec::blendv(zero, q * (one - lr - c * q / m), live);
    } else {  // TVD: ½ Σ |p - q|; g = ½ q sign(q - p)
      const Vec diff = q - p;
      v = half * diff.abs();
      const Vec sign = Vec::blendv(zero, one, diff > zero) - Vec::blendv(zero, one, diff < zero);
      g = half * q * sign;
    }
    vacc = vacc + v;
    if (grad) {
      g.store(t.x + i);
      gacc = gacc + g;
    }
  }
  auto add = [](Vec& x, Vec& y) { return x + y; };
  value += at::vec::vec_reduce_all<float>(add, vacc);
  gsum += at::vec::vec_reduce_all<float>(add, gacc);
}

using Pass = void (*)(const Side&, Side&, int64_t, int64_t, int64_t, float, bool, double&, double&);

Pass pass_for(Kind kind) {
  switch (kind) {
    case FORWARD: return value_grad<FORWARD>;
    case REVERSE: return value_grad<REVERSE>;
    case JSD: return value_grad<JSD>;
    case SKEW_FKL: return value_grad<SKEW_FKL>;
    case SKEW_RKL: return value_grad<SKEW_RKL>;
    default: return value_grad<TVD>;
  }
}

template <typename TS, typename TT, typename TO>
void rows_kernel(
    const TS* zs, int64_t zs_stride, const TT* zt, int64_t zt_stride, const float* weight,
    TO* out, int64_t out_stride, float* values, int64_t rows, int64_t v, Kind kind, float coef) {
  const int64_t padded = (v + 2 * W - 1) / (2 * W) * (2 * W);
  const int64_t blocks = (padded + BLOCK - 1) / BLOCK;
  const Pass pass = pass_for(kind);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(4 * padded);
    Side s(scratch.data(), scratch.data() + padded, blocks);
    Side t(scratch.data() + 2 * padded, scratch.data() + 3 * padded, blocks);
    const bool grad = weight != nullptr;
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t start = blk * BLOCK, stop = std::min(start + BLOCK, padded);
        s.load_block(zs + row * zs_stride, v, blk, start, stop);
        t.load_block(zt + row * zt_stride, v, blk, start, stop);
      }
      s.finish();
      t.finish();
      double value = 0.0, gsum = 0.0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t start = blk * BLOCK, stop = std::min(start + BLOCK, padded);
        pass(s, t, blk, start, stop, coef, grad, value, gsum);
      }
      values[row] = static_cast<float>(value);
      if (!grad) continue;
      // Pass 3: dz = (g - q Σg) w, the gradient on the student's logits, in out's dtype.
      const Vec gs(static_cast<float>(gsum)), w(weight[row]);
      TO* dst = out + row * out_stride;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t start = blk * BLOCK, stop = std::min(start + BLOCK, padded);
        const Vec ia(s.scale[blk]);
        for (int64_t i = start; i < stop; i += 2 * W) {
          const Vec lo = (Vec::loadu(t.x + i) - Vec::loadu(s.e + i) * ia * gs) * w;
          const Vec hi = (Vec::loadu(t.x + i + W) - Vec::loadu(s.e + i + W) * ia * gs) * w;
          store2(dst, i, v, lo, hi);
        }
      }
    }
  });
}

// Calls f with a value of the C++ type of an fp32 / bf16 / fp16 tensor.
template <typename F>
void with_type(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, "logits must be fp32, bf16 or fp16, got ", type);
  }
}

}  // namespace

// values (R,) fp32 of D(student row, teacher row); with weight (R,) also writes dz into out (R, V).
// zs, zt: (R, V) rows with unit inner stride, fp32 / bf16 / fp16; out: same shape, any of those.
torch::Tensor dense_rows(
    const torch::Tensor& zs, const torch::Tensor& zt, const c10::optional<torch::Tensor>& weight,
    const c10::optional<torch::Tensor>& out, int64_t kind, double coef) {
  TORCH_CHECK(zs.dim() == 2 && zt.dim() == 2 && zs.sizes() == zt.sizes(), "zs, zt: (R, V) alike");
  TORCH_CHECK(zs.stride(1) == 1 && zt.stride(1) == 1, "rows must be contiguous");
  TORCH_CHECK(kind >= FORWARD && kind <= TVD, "unknown divergence code");
  const int64_t rows = zs.size(0), v = zs.size(1);
  auto values = torch::empty({rows}, zs.options().dtype(torch::kFloat32));
  const float* w = nullptr;
  torch::Tensor w_contig;
  if (weight.has_value()) {
    TORCH_CHECK(out.has_value(), "a weight needs an out buffer");
    w_contig = weight->to(torch::kFloat32).contiguous();
    w = w_contig.data_ptr<float>();
    TORCH_CHECK(out->sizes() == zs.sizes() && out->stride(1) == 1, "out: (R, V), rows contiguous");
  }
  torch::Tensor o = out.has_value() ? *out : torch::empty({0, v}, zs.options());
  with_type(zs.scalar_type(), [&](auto ts) {
    using TS = decltype(ts);
    with_type(zt.scalar_type(), [&](auto tt) {
      using TT = decltype(tt);
      with_type(o.scalar_type(), [&](auto to) {
        using TO = decltype(to);
        rows_kernel<TS, TT, TO>(
            zs.data_ptr<TS>(), zs.stride(0), zt.data_ptr<TT>(), zt.stride(0), w,
            w ? o.data_ptr<TO>() : nullptr, o.stride(0), values.data_ptr<float>(), rows, v,
            static_cast<Kind>(kind), static_cast<float>(coef));
      });
    });
  });
  return values;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dense_rows", &dense_rows, "dense-teacher divergence rows: values, and dz into out");
}
