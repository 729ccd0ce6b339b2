// CPU kernels of the local reparameterization trick (LRT) linear layer.
//
// Forward, x [M, K], θ and log σ² [N, K]:
//   μ = x θᵀ + b,  v = (x ⊙ x) σ²ᵀ with σ² = exp(log σ²),  s = sqrt(v + 1e-8),  y = μ + s ⊙ z
// Backward, g = ∂L/∂y, h = g ⊙ z / (2s):
//   ∂θ = gᵀ x,  ∂log σ² = (hᵀ (x ⊙ x)) ⊙ σ²,  ∂b = Σ_rows g,  ∂x = g θ + 2x ⊙ (h σ²)
//
// The GEMMs go through ATen (MKL / oneDNN); the element-wise parts (σ², x ⊙ x, the
// sqrt-noise-mean epilogue, h, the ⊙ σ² and 2x ⊙ products) are fused loops, vectorized
// per instruction set like the KL kernel (see vec_math.h). The noise z is float32
// standard normal from torch's CPU generator seeded with `seed & (2^63 − 1)`: exactly
// sparsevd.dispatch.noise_from_seed, so the reference path gives the same numbers. It
// is regenerated in backward rather than kept: the saved state is x, θ, log σ², s and
// the seed.
//
// float32 and float64 take the fused path; float16 and bfloat16 run the same formulas
// as ATen ops (as the Python reference kernel does), so every dtype works.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "vec_math.h"

#if SPARSEVD_X86
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on _mm512_sqrt_ps itself
#endif

namespace sparsevd {
namespace {

constexpr float kEps = 1e-8f;  // what float32 PyTorch adds for the reference's 1e-8
constexpr double kEpsDouble = 1e-8;
// Elements per task of at::parallel_for for the element-wise loops: small layers run
// on the calling thread (waking the pool costs more than the loop).
constexpr int64_t kGrain = 32768;

// ---- float loops, one instantiation per instruction set -------------------------------------

// s = sqrt(v + eps) (in place of v), y = μ + s ⊙ z (in place of μ). Portable form; the
// x86 forms below use the sqrt instruction (with -fmath-errno, the default, the compiler
// does not vectorize std::sqrt).
SPARSEVD_INLINE void epilogue_scalar(float* mu, float* v, const float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = std::sqrt(v[i] + kEps);
    v[i] = s;
    mu[i] += s * z[i];
  }
}

// h = g ⊙ z / (2s)
template <int W>
SPARSEVD_INLINE void half_noise_over_std(const float* g, const float* z, const float* s, float* h,
                                         int64_t n) {
  using F = vm::vec<W>;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const F r = 0.5f * vm::load<W>(g + i) * vm::load<W>(z + i) / vm::load<W>(s + i);
    vm::store<W>(h + i, r);
  }
  for (; i < n; ++i) h[i] = 0.5f * g[i] * z[i] / s[i];
}

// out = exp(a), or out *= exp(a) with kMul
template <int W, bool kMul>
SPARSEVD_INLINE void exp_into(const float* a, float* out, int64_t n) {
  using F = vm::vec<W>;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    F e = vm::exp<W>(vm::load<W>(a + i));
    if constexpr (kMul) e = e * vm::load<W>(out + i);
    vm::store<W>(out + i, e);
  }
  if (i < n) {
    float tmp[W] = {};
    for (int64_t j = i; j < n; ++j) tmp[j - i] = a[j];
    F e = vm::exp<W>(vm::load<W>(tmp));
    vm::store<W>(tmp, e);
    for (int64_t j = i; j < n; ++j) out[j] = kMul ? out[j] * tmp[j - i] : tmp[j - i];
  }
}

// out = x ⊙ x
template <int W>
SPARSEVD_INLINE void square_into(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * x[i];
}

// dx += 2 x ⊙ t
template <int W>
SPARSEVD_INLINE void add_twice_product(float* dx, const float* x, const float* t, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] += 2.0f * x[i] * t[i];
}

struct FloatLoops {
  void (*epilogue)(float*, float*, const float*, int64_t);
  void (*half_noise_over_std)(const float*, const float*, const float*, float*, int64_t);
  void (*exp)(const float*, float*, int64_t);
  void (*mul_exp)(const float*, float*, int64_t);
  void (*square)(const float*, float*, int64_t);
  void (*add_twice_product)(float*, const float*, const float*, int64_t);
};

#define SPARSEVD_DEFINE_LOOPS(SUFFIX, TARGET, W, EPILOGUE)                                      \
  TARGET void epilogue_##SUFFIX(float* mu, float* v, const float* z, int64_t n) {               \
    EPILOGUE;                                                                                   \
  }                                                                                             \
  TARGET void half_noise_over_std_##SUFFIX(const float* g, const float* z, const float* s,      \
                                           float* h, int64_t n) {                               \
    half_noise_over_std<W>(g, z, s, h, n);                                                      \
  }                                                                                             \
  TARGET void exp_##SUFFIX(const float* a, float* out, int64_t n) { exp_into<W, false>(a, out, n); } \
  TARGET void mul_exp_##SUFFIX(const float* a, float* out, int64_t n) {                         \
    exp_into<W, true>(a, out, n);                                                               \
  }                                                                                             \
  TARGET void square_##SUFFIX(const float* x, float* out, int64_t n) { square_into<W>(x, out, n); } \
  TARGET void add_twice_product_##SUFFIX(float* dx, const float* x, const float* t, int64_t n) { \
    add_twice_product<W>(dx, x, t, n);                                                          \
  }                                                                                             \
  constexpr FloatLoops kLoops_##SUFFIX = {epilogue_##SUFFIX,          half_noise_over_std_##SUFFIX, \
                                          exp_##SUFFIX,               mul_exp_##SUFFIX,             \
                                          square_##SUFFIX,            add_twice_product_##SUFFIX};

// 4 lanes: one SSE2 / NEON register (wider generic vectors are lowered lane by lane).
#define SPARSEVD_NO_TARGET
SPARSEVD_DEFINE_LOOPS(portable, SPARSEVD_NO_TARGET, 4, epilogue_scalar(mu, v, z, n))

#if SPARSEVD_X86
#define SPARSEVD_EPILOGUE_X86(W, LOAD, STORE, SQRT, ADD, MUL, SET1)  \
  int64_t i = 0;                                                 \
  const auto eps = SET1(kEps);                                   \
  for (; i + W <= n; i += W) {                                   \
    const auto s = SQRT(ADD(LOAD(v + i), eps));                  \
    STORE(v + i, s);                                             \
    STORE(mu + i, ADD(LOAD(mu + i), MUL(s, LOAD(z + i))));       \
  }                                                              \
  epilogue_scalar(mu + i, v + i, z + i, n - i);
SPARSEVD_DEFINE_LOOPS(avx512, SPARSEVD_TARGET_AVX512, 16,
                      SPARSEVD_EPILOGUE_X86(16, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_sqrt_ps,
                                            _mm512_add_ps, _mm512_mul_ps, _mm512_set1_ps))
SPARSEVD_DEFINE_LOOPS(avx2, SPARSEVD_TARGET_AVX2, 8,
                      SPARSEVD_EPILOGUE_X86(8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_sqrt_ps,
                                            _mm256_add_ps, _mm256_mul_ps, _mm256_set1_ps))
#endif

const FloatLoops& float_loops() {
#if SPARSEVD_X86
  switch (vm::cpu_isa()) {
    case vm::Isa::kAvx512: return kLoops_avx512;
    case vm::Isa::kAvx2: return kLoops_avx2;
    default: break;
  }
#endif
  return kLoops_portable;
}

// ---- element-wise passes, float and double ----------------------------------------------------

// Runs fn(begin, end) over [0, n) in parallel, in tasks of at least kGrain elements.
template <typename Fn>
void parallel_elementwise(int64_t n, const Fn& fn) {
  if (n <= 0) return;
  if (n <= kGrain) {
    fn(int64_t(0), n);
  } else {
    at::parallel_for(0, n, kGrain, fn);
  }
}

// σ² = exp(log σ²) as a new contiguous tensor.
at::Tensor exp_of(const at::Tensor& a) {
  auto out = at::empty_like(a, at::MemoryFormat::Contiguous);
  if (a.scalar_type() == at::kFloat) {
    const float* ap = a.const_data_ptr<float>();
    float* op = out.mutable_data_ptr<float>();
    const auto f = float_loops().exp;
    parallel_elementwise(a.numel(), [&](int64_t b, int64_t e) { f(ap + b, op + b, e - b); });
  } else {
    at::exp_out(out, a);
  }
  return out;
}

// x ⊙ x as a new contiguous tensor.
at::Tensor square_of(const at::Tensor& x) {
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.scalar_type() == at::kFloat) {
    const float* xp = x.const_data_ptr<float>();
    float* op = out.mutable_data_ptr<float>();
    const auto f = float_loops().square;
    parallel_elementwise(x.numel(), [&](int64_t b, int64_t e) { f(xp + b, op + b, e - b); });
  } else {
    at::mul_out(out, x, x);
  }
  return out;
}

// ---- noise -----------------------------------------------------------------------------------

int64_t seed_value(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
              ": seed must be a one-element int64 CPU tensor, got ", seed.scalar_type(), " ",
              seed.sizes(), " on ", seed.device());
  return seed.item<int64_t>();
}

// Bit for bit what sparsevd.dispatch.noise_from_seed(M, N, seed, "cpu") returns:
// torch.Generator().manual_seed(seed & (2**63 - 1)), then torch.randn(M, N) in float32.
at::Tensor noise_from_seed(int64_t rows, int64_t cols, int64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(
      static_cast<uint64_t>(seed & std::numeric_limits<int64_t>::max()));
  return at::randn({rows, cols}, gen, at::TensorOptions().dtype(at::kFloat));
}

// ---- checks ----------------------------------------------------------------------------------

void check_lrt(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& log_sigma2,
               const char* op) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, op, ": expected x [M, K] and weight [N, K], got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x has ", x.size(1), " features but weight has ",
              weight.size(1));
  TORCH_CHECK(log_sigma2.sizes() == weight.sizes(), op,
              ": log_sigma2 must have the shape of weight ", weight.sizes(), ", got ",
              log_sigma2.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  log_sigma2.scalar_type() == weight.scalar_type(),
              op, ": x, weight and log_sigma2 must have one dtype, got ", x.scalar_type(), ", ",
              weight.scalar_type(), " and ", log_sigma2.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected floating-point tensors, got ",
              x.scalar_type());
}

bool fused_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// ---- the sampling epilogue, shared by lrt_linear and lrt_sample --------------------------------

// s = sqrt(v + eps) into v, y = μ + s ⊙ z into mu: contiguous float32 / float64, z float32.
void sample_in_place(at::Tensor& mu, at::Tensor& v, const at::Tensor& z) {
  TORCH_INTERNAL_ASSERT(mu.is_contiguous() && v.is_contiguous() && z.is_contiguous());
  const int64_t count = mu.numel();
  const float* zp = z.const_data_ptr<float>();
  if (mu.scalar_type() == at::kFloat) {
    float* mp = mu.mutable_data_ptr<float>();
    float* vp = v.mutable_data_ptr<float>();
    const auto f = float_loops().epilogue;
    parallel_elementwise(count, [&](int64_t b, int64_t e) { f(mp + b, vp + b, zp + b, e - b); });
  } else {
    double* mp = mu.mutable_data_ptr<double>();
    double* vp = v.mutable_data_ptr<double>();
    parallel_elementwise(count, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const double s = std::sqrt(vp[i] + kEpsDouble);
        vp[i] = s;
        mp[i] += s * double(zp[i]);
      }
    });
  }
}

// h = g ⊙ z / (2s) for contiguous float32 / float64 g and s, z float32.
at::Tensor half_noise_over_std_of(const at::Tensor& g, const at::Tensor& z, const at::Tensor& sd) {
  TORCH_INTERNAL_ASSERT(g.is_contiguous() && z.is_contiguous() && sd.is_contiguous());
  auto h = at::empty_like(g);
  const int64_t count = g.numel();
  const float* zp = z.const_data_ptr<float>();
  if (g.scalar_type() == at::kFloat) {
    const float* gp = g.const_data_ptr<float>();
    const float* sp = sd.const_data_ptr<float>();
    float* hp = h.mutable_data_ptr<float>();
    const auto f = float_loops().half_noise_over_std;
    parallel_elementwise(count, [&](int64_t b, int64_t e) { f(gp + b, zp + b, sp + b, hp + b, e - b); });
  } else {
    const double* gp = g.const_data_ptr<double>();
    const double* sp = sd.const_data_ptr<double>();
    double* hp = h.mutable_data_ptr<double>();
    parallel_elementwise(count, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hp[i] = 0.5 * gp[i] * double(zp[i]) / sp[i];
    });
  }
  return h;
}

// ---- forward ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> lrt_linear_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                                                   const at::Tensor& ls_in,
                                                   const std::optional<at::Tensor>& bias,
                                                   const at::Tensor& seed) {
  constexpr const char* op = "lrt_linear";
  check_lrt(x_in, w_in, ls_in, op);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w_in.size(0), op, ": bias must have shape (",
                w_in.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x_in.scalar_type(), op, ": bias has dtype ",
                bias->scalar_type(), " but x has ", x_in.scalar_type());
  }
  const int64_t seed_v = seed_value(seed, op);
  const int64_t m = x_in.size(0), n = w_in.size(0);
  const auto z = noise_from_seed(m, n, seed_v);

  if (!fused_dtype(x_in)) {  // float16 / bfloat16: the reference formulas in ATen ops
    const auto std_ = at::sqrt(at::linear(x_in * x_in, at::exp(ls_in)) + kEpsDouble);
    const auto y = at::linear(x_in, w_in, bias) + std_ * z.to(x_in.scalar_type());
    return {y, std_};
  }

  const auto x = x_in.contiguous(), w = w_in.contiguous(), ls = ls_in.contiguous();
  const auto sigma2 = exp_of(ls);
  const auto x2 = square_of(x);
  at::Tensor mu = bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  at::Tensor v = at::mm(x2, sigma2.t());
  sample_in_place(mu, v, z);
  return {mu, v};
}

at::Tensor lrt_noise_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& seed) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "lrt_noise: expected x [M, K] and weight [N, K], got ",
              x.sizes(), " and ", weight.sizes());
  return noise_from_seed(x.size(0), weight.size(0), seed_value(seed, "lrt_noise"));
}

// ---- backward --------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lrt_linear_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& ls_in,
    const at::Tensor& std_in, const at::Tensor& seed, std::array<bool, 4> output_mask) {
  constexpr const char* op = "lrt_linear_backward";
  check_lrt(x_in, w_in, ls_in, op);
  const int64_t m = x_in.size(0), n = w_in.size(0);
  TORCH_CHECK(grad_in.sizes() == std_in.sizes() && grad_in.dim() == 2 && grad_in.size(0) == m &&
                  grad_in.size(1) == n,
              op, ": grad and std must have shape [", m, ", ", n, "], got ", grad_in.sizes(), " and ",
              std_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type() && std_in.scalar_type() == x_in.scalar_type(),
              op, ": grad and std must have the dtype of x (", x_in.scalar_type(), "), got ",
              grad_in.scalar_type(), " and ", std_in.scalar_type());
  const auto [need_x, need_w, need_s, need_b] = output_mask;
  const auto empty = at::empty({0}, grad_in.options());
  const auto z = noise_from_seed(m, n, seed_value(seed, op));

  if (!fused_dtype(x_in)) {  // float16 / bfloat16: the reference formulas in ATen ops
    const auto h = grad_in * z.to(grad_in.scalar_type()) / (2 * std_in);
    const auto sigma2 = at::exp(ls_in);
    return {need_x ? at::mm(grad_in, w_in) + 2 * x_in * at::mm(h, sigma2) : empty,
            need_w ? at::mm(grad_in.t(), x_in) : empty,
            need_s ? at::mm(h.t(), x_in * x_in) * sigma2 : empty,
            need_b ? grad_in.sum(0) : empty};
  }

  const auto g = grad_in.contiguous(), x = x_in.contiguous(), w = w_in.contiguous(),
             ls = ls_in.contiguous(), sd = std_in.contiguous();
  at::Tensor dx = empty, dw = empty, ds = empty, db = empty;
  if (need_w) dw = at::mm(g.t(), x);
  if (need_b) db = g.sum(0);
  if (!need_x && !need_s) return {dx, dw, ds, db};

  const auto h = half_noise_over_std_of(g, z, sd);

  const bool is_float = x.scalar_type() == at::kFloat;
  at::Tensor sigma2;  // materialized only when ∂x needs the GEMM h σ²
  if (need_x) sigma2 = exp_of(ls);
  if (need_s) {
    ds = at::mm(h.t(), square_of(x));  // [N, K], then ⊙ σ²
    if (sigma2.defined()) {
      ds.mul_(sigma2);
    } else if (is_float) {
      const float* lp = ls.const_data_ptr<float>();
      float* dp = ds.mutable_data_ptr<float>();
      const auto f = float_loops().mul_exp;
      parallel_elementwise(ds.numel(), [&](int64_t b, int64_t e) { f(lp + b, dp + b, e - b); });
    } else {
      ds.mul_(at::exp(ls));
    }
  }
  if (need_x) {
    dx = at::mm(g, w);
    const auto t = at::mm(h, sigma2);  // [M, K]
    if (is_float) {
      float* dxp = dx.mutable_data_ptr<float>();
      const float* xp = x.const_data_ptr<float>();
      const float* tp = t.const_data_ptr<float>();
      const auto f = float_loops().add_twice_product;
      parallel_elementwise(dx.numel(), [&](int64_t b, int64_t e) { f(dxp + b, xp + b, tp + b, e - b); });
    } else {
      dx.addcmul_(x, t, 2);
    }
  }
  return {dx, dw, ds, db};
}

// ---- the sampling step alone ----------------------------------------------------------------

void check_same_layout(const at::Tensor& a, const at::Tensor& b, const char* a_name,
                       const char* b_name, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", a_name, " and ", b_name,
              " must have one shape, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
              " must have one dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": expected floating-point tensors, got ",
              a.scalar_type());
}

// The noise of lrt_sample: the flat stream noise_from_seed draws, in the output's shape
// (torch's CPU normal fill depends on the element count only, not on the shape).
at::Tensor sample_noise(const at::Tensor& like, int64_t seed) {
  return noise_from_seed(1, like.numel(), seed).view(like.sizes());
}

std::tuple<at::Tensor, at::Tensor> lrt_sample_cpu(const at::Tensor& mean, const at::Tensor& var,
                                                   const at::Tensor& seed) {
  constexpr const char* op = "lrt_sample";
  check_same_layout(mean, var, "mean", "var", op);
  const auto z = sample_noise(mean, seed_value(seed, op));
  if (!fused_dtype(mean)) {  // float16 / bfloat16: the reference formula in ATen ops
    const auto std_ = at::sqrt(var + kEpsDouble).contiguous();
    return {(mean + std_ * z.to(mean.scalar_type())).contiguous(), std_};
  }
  auto y = mean.clone(at::MemoryFormat::Contiguous);
  auto s = var.clone(at::MemoryFormat::Contiguous);
  sample_in_place(y, s, z);
  return {y, s};
}

at::Tensor lrt_sample_backward_cpu(const at::Tensor& grad, const at::Tensor& std_in,
                                   const at::Tensor& seed) {
  constexpr const char* op = "lrt_sample_backward";
  check_same_layout(grad, std_in, "grad", "std", op);
  const auto z = sample_noise(grad, seed_value(seed, op));
  if (!fused_dtype(grad)) return (grad * z.to(grad.scalar_type()) / (2 * std_in)).contiguous();
  return half_noise_over_std_of(grad.contiguous(), z, std_in.contiguous());
}

at::Tensor lrt_sample_noise_cpu(const at::Tensor& mean, const at::Tensor& seed) {
  return sample_noise(mean, seed_value(seed, "lrt_sample_noise"));
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) {
  m.impl("lrt_linear", &lrt_linear_cpu);
  m.impl("lrt_linear_backward", &lrt_linear_backward_cpu);
  m.impl("lrt_noise", &lrt_noise_cpu);
  m.impl("lrt_sample", &lrt_sample_cpu);
  m.impl("lrt_sample_backward", &lrt_sample_backward_cpu);
  m.impl("lrt_sample_noise", &lrt_sample_noise_cpu);
}

}  // namespace sparsevd
