// Fused CPU kernels for the SparseVD KL term: one vectorized sweep over θ and log σ²
// gives the KL sum and, when asked, ∂KL/∂θ and ∂KL/∂log σ² (eager PyTorch spends ~10
// passes and as many temporaries on the same arithmetic, and twice the exp/log work
// when forward and backward are separate).
//
// Per weight, with d = θ² + 1e-8 and la = clamp(log σ² − log d, lo, hi):
//   KL      = k1·(1 − sigmoid(k2 + k3·la)) + ½·softplus(−la)
//   ∂KL/∂la = −k1·k3·σ(1 − σ) − ½·sigmoid(−la)   (0 where the clamp is active, bounds included)
//   ∂KL/∂log σ² = ∂KL/∂la,   ∂KL/∂θ = ∂KL/∂la · (−2θ / d)
// With e1 = exp(−(k2 + k3·la)) and e2 = exp(−|la|) everything above is two exps, one
// log (of d), a polynomial for log1p(e2), and one division (two with gradients:
// 1/((1 + e1)(1 + e2)) gives both sigmoids, and 1/d).
//
// float, float16 and bfloat16 compute in float (vectors of 16 lanes with AVX-512, 8
// with AVX2, 4 in the portable build); float64 computes in double with libm.
// The sum is accumulated in double per fixed chunk of kChunk weights, and the chunk
// sums are added in order: the same input gives the same bits with any thread count.
// A NaN in θ or log σ² gives a NaN sum and NaN gradients for that weight (torch.clamp's
// backward would silently give 0 there).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "vec_math.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace sparsevd {
namespace {

constexpr double kK1 = 0.63576, kK2 = 1.87320, kK3 = 1.48695, kEps = 1e-8;
// Fixed chunks (independent of the thread count) whose partial sums are added in
// order: the same input gives the same bits with any number of threads.
constexpr int64_t kChunk = 4096;
// Chunks per task of at::parallel_for: tensors below ~32k weights stay on one thread.
constexpr int64_t kGrainChunks = 8;

// ---- float lanes ------------------------------------------------------------------------

// log1p(x) for x ∈ [0, 1] as x + x²·R(x), R a degree-9 fit (max error 1.3 ulp in
// float32; no log, no division).
template <int W>
SPARSEVD_INLINE vm::vec<W> log1p_unit(vm::vec<W> x) {
  vm::vec<W> r = 2.072950825e-03f * x - 1.363149658e-02f;
  r = r * x + 4.198139533e-02f;
  r = r * x - 8.307410777e-02f;
  r = r * x + 1.246712506e-01f;
  r = r * x - 1.612933725e-01f;
  r = r * x + 1.989793181e-01f;
  r = r * x - 2.498857975e-01f;
  r = r * x + 3.333269060e-01f;
  r = r * x - 4.999998808e-01f;
  return (x * x) * r + x;
}

// KL of W weights and, with kGrad, scale·∂KL/∂θ and scale·∂KL/∂log σ².
template <int W, bool kGrad>
SPARSEVD_INLINE vm::vec<W> kl_lanes(vm::vec<W> w, vm::vec<W> s, float lo, float hi, float scale,
                                     vm::vec<W>* dw, vm::vec<W>* ds) {
  using F = vm::vec<W>;
  const F zero{}, one = vm::splat<W>(1.0f);
  // Comparisons take vectors on both sides and feed selects only: otherwise GCC may
  // compare lane by lane.
  const F lov = vm::splat<W>(lo), hiv = vm::splat<W>(hi);
  const F d = w * w + float(kEps);
  const F la = s - vm::log<W>(d);
  F lac = la < lov ? lov : la;  // NaN stays NaN through both selects
  lac = lac > hiv ? hiv : lac;
  const F e1 = vm::exp<W>(-(float(kK2) + float(kK3) * lac));  // sigmoid(k2 + k3·la) = 1/(1 + e1)
  const F neg = lac < zero ? -lac : zero;                      // max(−la, 0)
  const F e2 = vm::exp<W>(-(lac < zero ? -lac : lac));         // exp(−|la|) ∈ (0, 1]
  // softplus(−la) = max(−la, 0) + log1p(exp(−|la|))
  const F softplus = neg + log1p_unit<W>(e2);
  if constexpr (!kGrad) {
    return float(kK1) * (e1 / (1.0f + e1)) + 0.5f * softplus;
  } else {
    // 1/(1 + e1) and 1/(1 + e2) from one division; e1 is capped so the product stays
    // a normal float (where the cap acts, sigmoid < 1e-30 either way).
    const F cap = vm::splat<W>(1e30f);
    const F e1c = e1 > cap ? cap : e1;  // NaN kept
    const F p1 = 1.0f + e1c;
    const F p2 = 1.0f + e2;
    const F r = 1.0f / (p1 * p2);
    const F sig = r * p2;  // sigmoid(k2 + k3·la)
    const F one_minus_sig = e1c * sig;
    const F sig_neg = (lac < zero ? one : e2) * (r * p1);  // sigmoid(−la)
    F dla = -float(kK1 * kK3) * sig * one_minus_sig - 0.5f * sig_neg;
    // The gradient passes where the clamp is inactive, lo < la < hi: torch.clamp's
    // backward (torch 2.14) gives 0 at the bounds themselves. NaN (no comparison true)
    // keeps the NaN computed from it. Two selects in a row would be merged by GCC into
    // one "outside" test that it lowers lane by lane: multiply by 0/1 factors instead.
    dla = dla * (la <= lov ? zero : one) * (la >= hiv ? zero : one);
    dla = dla * scale;
    *ds = dla;
    *dw = dla * (-2.0f * w) / d;
    return float(kK1) * one_minus_sig + 0.5f * softplus;
  }
}

// scale·∂ and the KL sum (in double, lanes added in a fixed order) of n weights.
template <int W, bool kSum, bool kGrad, typename T>
SPARSEVD_INLINE double kl_span(const T* wp, const T* sp, T* dwp, T* dsp, int64_t n, float lo,
                               float hi, float scale) {
  using F = vm::vec<W>;
  using D = vm::dvec<W>;
  D acc_d{};
  F acc{};
  F dw, ds;
  int64_t i = 0;
  int pending = 0;
  for (; i + W <= n; i += W) {
    const F kl = kl_lanes<W, kGrad>(vm::load_as_float<W>(wp + i), vm::load_as_float<W>(sp + i),
                                    lo, hi, scale, &dw, &ds);
    if constexpr (kSum) {
      acc = acc + kl;
      if (++pending == 16) {  // at most 16 float additions per lane before going to double
        acc_d = acc_d + __builtin_convertvector(acc, D);
        acc = F{};
        pending = 0;
      }
    }
    if constexpr (kGrad) {
      vm::store_from_float<W>(dwp + i, dw);
      vm::store_from_float<W>(dsp + i, ds);
    }
  }
  if (i < n) {  // the tail, padded with a harmless weight and masked out of the sum
    const int rest = int(n - i);
    float wt[W], st[W], dwt[W], dst[W];
    for (int j = 0; j < W; ++j) {
      wt[j] = j < rest ? float(wp[i + j]) : 1.0f;
      st[j] = j < rest ? float(sp[i + j]) : 0.0f;
    }
    F kl = kl_lanes<W, kGrad>(vm::load<W>(wt), vm::load<W>(st), lo, hi, scale, &dw, &ds);
    if constexpr (kSum) {
      vm::ivec<W> lane;
      for (int j = 0; j < W; ++j) lane[j] = j;
      kl = lane < (vm::ivec<W>{} + rest) ? kl : F{};
      acc = acc + kl;
    }
    if constexpr (kGrad) {
      vm::store<W>(dwt, dw);
      vm::store<W>(dst, ds);
      for (int j = 0; j < rest; ++j) {
        dwp[i + j] = T(dwt[j]);
        dsp[i + j] = T(dst[j]);
      }
    }
  }
  if constexpr (kSum) {
    acc_d = acc_d + __builtin_convertvector(acc, D);
    return vm::hsum<W>(acc_d);
  }
  return 0.0;
}

template <typename T>
using SpanFn = double (*)(const T*, const T*, T*, T*, int64_t, float, float, float);

// One instantiation per instruction set; the widths are what measured fastest.
#if SPARSEVD_X86
template <bool kSum, bool kGrad, typename T>
SPARSEVD_TARGET_AVX512 double kl_span_avx512(const T* wp, const T* sp, T* dwp, T* dsp, int64_t n,
                                             float lo, float hi, float scale) {
  return kl_span<16, kSum, kGrad, T>(wp, sp, dwp, dsp, n, lo, hi, scale);
}
template <bool kSum, bool kGrad, typename T>
SPARSEVD_TARGET_AVX2 double kl_span_avx2(const T* wp, const T* sp, T* dwp, T* dsp, int64_t n,
                                         float lo, float hi, float scale) {
  return kl_span<8, kSum, kGrad, T>(wp, sp, dwp, dsp, n, lo, hi, scale);
}
#endif
// 4 lanes: one SSE2 / NEON register (wider generic vectors are lowered lane by lane).
template <bool kSum, bool kGrad, typename T>
double kl_span_portable(const T* wp, const T* sp, T* dwp, T* dsp, int64_t n, float lo, float hi,
                        float scale) {
  return kl_span<4, kSum, kGrad, T>(wp, sp, dwp, dsp, n, lo, hi, scale);
}

template <bool kSum, bool kGrad, typename T>
SpanFn<T> pick_span() {
#if SPARSEVD_X86
  switch (vm::cpu_isa()) {
    case vm::Isa::kAvx512: return &kl_span_avx512<kSum, kGrad, T>;
    case vm::Isa::kAvx2: return &kl_span_avx2<kSum, kGrad, T>;
    default: break;
  }
#endif
  return &kl_span_portable<kSum, kGrad, T>;
}

// ---- float64: libm, same structure --------------------------------------------------------

template <bool kSum, bool kGrad>
double kl_span_double(const double* wp, const double* sp, double* dwp, double* dsp, int64_t n,
                      double lo, double hi, double scale) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double w = wp[i];
    const double d = w * w + kEps;
    const double la = sp[i] - std::log(d);
    const double lac = std::min(std::max(la, lo), hi);  // NaN stays NaN
    const double e1 = std::exp(-(kK2 + kK3 * lac));
    const double sig = 1.0 / (1.0 + e1);
    const double one_minus_sig = std::isinf(e1) ? 1.0 : e1 * sig;  // la ≲ −478: e1 overflows
    const double e2 = std::exp(-std::abs(lac));
    if constexpr (kSum) sum += kK1 * one_minus_sig + 0.5 * (std::max(-lac, 0.0) + std::log1p(e2));
    if constexpr (kGrad) {
      const double sig_neg = (lac < 0 ? 1.0 : e2) / (1.0 + e2);
      double dla = -kK1 * kK3 * sig * one_minus_sig - 0.5 * sig_neg;
      if (la <= lo || la >= hi) dla = 0;  // as torch.clamp's backward; NaN passes
      dla *= scale;
      dsp[i] = dla;
      dwp[i] = dla * (-2.0 * w) / d;
    }
  }
  return sum;
}

// ---- the sweep ----------------------------------------------------------------------------

void check_params(const at::Tensor& weight, const at::Tensor& log_sigma2, const char* op) {
  TORCH_CHECK(weight.sizes() == log_sigma2.sizes(), op,
              ": weight and log_sigma2 must have the same shape, got ", weight.sizes(),
              " and ", log_sigma2.sizes());
  TORCH_CHECK(weight.scalar_type() == log_sigma2.scalar_type(), op,
              ": weight and log_sigma2 must have the same dtype, got ", weight.scalar_type(),
              " and ", log_sigma2.scalar_type());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op,
              ": expected floating-point parameters, got ", weight.scalar_type());
}

// Fresh gradient buffers are first touched by the sweep: on a big layer the page faults
// of 4 KiB pages cost more than the arithmetic (~28 ms for 64 MiB measured on a VM). Ask
// for transparent huge pages on the 2 MiB-aligned part, as PyTorch's own allocator does
// under THP_MEM_ALLOC_ENABLE=1; advisory only (a no-op where THP is off). Only from
// 32 MiB, where glibc always maps a block of its own: the advice ends with the tensor.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto bytes = static_cast<uintptr_t>(t.nbytes());
  if (bytes < (uintptr_t(32) << 20)) return;
  const auto p = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// Runs the sweep; returns the KL sum (0 when !kSum) and fills dw, ds when kGrad.
template <bool kSum, bool kGrad>
double sweep(const at::Tensor& w, const at::Tensor& s, at::Tensor* dw, at::Tensor* ds, double lo,
             double hi, double scale) {
  const int64_t n = w.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(kSum ? chunks : 0, 0.0);
  if constexpr (kGrad) {
    advise_huge_pages(*dw);
    advise_huge_pages(*ds);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "kl_divergence_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* dwp = kGrad ? dw->mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dsp = kGrad ? ds->mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, chunks, kGrainChunks, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * kChunk, len = std::min(n - begin, kChunk);
        double part;
        if constexpr (std::is_same_v<scalar_t, double>) {
          part = kl_span_double<kSum, kGrad>(wp + begin, sp + begin, kGrad ? dwp + begin : nullptr,
                                             kGrad ? dsp + begin : nullptr, len, lo, hi, scale);
        } else {
          static const SpanFn<scalar_t> span = pick_span<kSum, kGrad, scalar_t>();
          part = span(wp + begin, sp + begin, kGrad ? dwp + begin : nullptr,
                      kGrad ? dsp + begin : nullptr, len, float(lo), float(hi), float(scale));
        }
        if constexpr (kSum) partial[c] = part;
      }
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

at::Tensor kl_result(double total, const at::Tensor& weight) {
  const auto dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(total, at::TensorOptions().dtype(dtype));
}

at::Tensor kl_divergence_cpu(const at::Tensor& weight, const at::Tensor& log_sigma2, double lo,
                             double hi) {
  check_params(weight, log_sigma2, "kl_divergence");
  const auto w = weight.contiguous(), s = log_sigma2.contiguous();
  return kl_result(sweep<true, false>(w, s, nullptr, nullptr, lo, hi, 1.0), weight);
}

std::tuple<at::Tensor, at::Tensor> kl_divergence_backward_cpu(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& log_sigma2, double lo,
    double hi) {
  check_params(weight, log_sigma2, "kl_divergence_backward");
  TORCH_CHECK(grad.numel() == 1, "kl_divergence_backward: grad must hold one element, got ",
              grad.sizes());
  const auto w = weight.contiguous(), s = log_sigma2.contiguous();
  auto dw = at::empty_like(w), ds = at::empty_like(s);
  sweep<false, true>(w, s, &dw, &ds, lo, hi, grad.item<double>());
  return {dw, ds};
}

// (Σ KL, ∂KL/∂θ, ∂KL/∂log σ²) in one sweep: autograd keeps the two gradients and
// scales them by the incoming grad in backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_divergence_with_grad_cpu(
    const at::Tensor& weight, const at::Tensor& log_sigma2, double lo, double hi) {
  check_params(weight, log_sigma2, "kl_divergence_with_grad");
  const auto w = weight.contiguous(), s = log_sigma2.contiguous();
  auto dw = at::empty_like(w), ds = at::empty_like(s);
  const double total = sweep<true, true>(w, s, &dw, &ds, lo, hi, 1.0);
  return {kl_result(total, weight), dw, ds};
}


}  // namespace

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) {
  m.impl("kl_divergence", &kl_divergence_cpu);
  m.impl("kl_divergence_backward", &kl_divergence_backward_cpu);
  m.impl("kl_divergence_with_grad", &kl_divergence_with_grad_cpu);
}

}  // namespace sparsevd
