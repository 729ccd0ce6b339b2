// CPU kernels of Structured Bayesian Pruning (sparsevd/reference.py, SBP section, is the
// spec; the formulas and their stable rearrangements are explained there).
//
// sbp_kl: per unit, the KL of log θ ~ N(μ, σ²) truncated to [a, b] against the log-uniform
// prior and its two gradients, in double with libm (units are few; eager PyTorch spends
// ~300 small ops on the same arithmetic, and erfcx/log_ndtr there are scalar anyway).
//
// sbp_sample: θ [batch, units] by the inverse CDF at uniforms from `seed` (torch's CPU
// generator, so exactly sbp_noise and the reference's uniforms), and ∂θ/∂μ, ∂θ/∂log σ per
// element. The per-unit constants of the mirrored frame are computed once in double; the
// per-element part runs in float lanes (16 with AVX-512, 8 with AVX2, 4 portable) for
// float32/16 parameters and in double for float64:
//   P ≥ −5: ξ = ndtri(Φ(P)·w) (Acklam's rational approximation, relative error 1.2e-9,
//           refined by one Halley step in double), x = μ + sσξ;
//   P < −5: the distance δ = P − ξ by Newton's method, with h(ξ) − h(P) from Laplace's
//           continued fraction run at both points with the recursion of its difference.
// A NaN in μ or log σ is an error (the reference raises too).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vec_math.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace sparsevd {
namespace {

constexpr double kLogSqrt2Pi = 0.91893853320467274178;     // log √(2π)
constexpr double kLogSqrtHalfPi = 0.22579135264472743236;  // log √(π/2)
constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kLog2 = 0.69314718055994530942;
constexpr double kParamLo = -20.0, kParamHi = 5.0;  // clip of μ and log σ
constexpr double kUClip = 1e-5;
constexpr double kTail = 5.0;
// Depth of the continued fraction at y ≥ 5 that reaches double (float) rounding, measured
// against mpmath: it falls from 28 (10) terms at y = 5 to 5 (2) at y ≥ 100.
int cf_depth_double(double y) {
  return y < 6 ? 28 : y < 7 ? 22 : y < 8 ? 19 : y < 10 ? 16 : y < 12 ? 14 : y < 15 ? 12 : y < 20 ? 10
       : y < 30 ? 9 : y < 50 ? 7 : y < 100 ? 6 : 5;
}
int cf_depth_float(double y) {
  return y < 6 ? 10 : y < 7 ? 8 : y < 8 ? 7 : y < 10 ? 6 : y < 12 ? 5 : y < 20 ? 4 : y < 50 ? 3 : 2;
}
// Newton steps of the tail sampler from the root of its quadratic part (measured: two
// reach float rounding for y ≥ 5 and one for y ≥ 30; three reach double rounding).
constexpr int kNewtonDouble = 3;
int newton_steps_float(double y) { return y < 30 ? 2 : 1; }

// ---- per unit, double ------------------------------------------------------------------------

// Laplace's continued fraction for φ/Φ at −y, y ≥ 5: m = y + 1/D₁, D_k = y + (k + 1)/D_{k+1};
// E = 1/D₁ (the gap x + φ/Φ) and V = E (2/D₂ − E) (the one-sided variance), no cancellation.
double mills_cf(double y, double* e, double* v) {
  double d = y, d2 = y;
  for (int k = cf_depth_double(y); k >= 1; --k) {
    d2 = d;
    d = y + (k + 1) / d;
  }
  *e = 1 / d;
  *v = *e * (2 / d2 - *e);
  return y + *e;
}

// h(x) = log(Φ(x)/φ(x)) for x ≤ 0.
double log_mills(double x) {
  if (x < -kTail) {
    double e, v;
    return -std::log(mills_cf(-x, &e, &v));
  }
  return kLogSqrtHalfPi + 0.5 * x * x + std::log(std::erfc(-x * kSqrtHalf));
}

double log1mexp(double d) { return d > -kLog2 ? std::log(-std::expm1(d)) : std::log1p(-std::exp(d)); }

// The standard normal truncated to [α, β], mirrored so its mass is at the upper end P.
// E_P, V_P: the gap P + φ/Φ and one-sided variance 1 − (φ/Φ)·E at P (reference._gap).
struct Frame {
  double P, Q, h_P, h_Q, log_ndtr_P, m_P, m_Q, D, eD, q, log_q, r_P, r_Q, E_P, V_P;
  bool flip, lower;
};

Frame make_frame(double alpha, double beta) {
  Frame f;
  f.flip = alpha + beta > 0;
  f.P = f.flip ? -alpha : beta;
  f.Q = f.flip ? -beta : alpha;
  f.lower = f.P <= 0;
  f.h_Q = log_mills(f.Q);
  f.m_Q = std::exp(-f.h_Q);
  if (f.lower) {
    if (f.P < -kTail) {
      f.m_P = mills_cf(-f.P, &f.E_P, &f.V_P);
      f.h_P = -std::log(f.m_P);
    } else {
      f.h_P = log_mills(f.P);
      f.m_P = std::exp(-f.h_P);
    }
    f.log_ndtr_P = 0;
    f.D = -0.5 * (f.Q - f.P) * (f.Q + f.P) + f.h_Q - f.h_P;
  } else {
    f.h_P = kLogSqrtHalfPi;  // h(0), unused above 0
    f.log_ndtr_P = std::log1p(-0.5 * std::erfc(f.P * kSqrtHalf));
    f.m_P = std::exp(-0.5 * f.P * f.P - kLogSqrt2Pi - f.log_ndtr_P);
    f.D = -0.5 * f.Q * f.Q - kLogSqrt2Pi + f.h_Q - f.log_ndtr_P;
  }
  f.eD = std::exp(f.D);
  f.q = -std::expm1(f.D);
  f.log_q = log1mexp(f.D);
  f.r_P = f.m_P / f.q;
  f.r_Q = f.m_Q * f.eD / f.q;
  if (!(f.P < -kTail)) {
    f.E_P = f.P + f.m_P;
    f.V_P = 1 - f.m_P * f.E_P;
  }
  return f;
}

struct Unit {
  Frame f;
  double mu, log_sigma, sigma, sign, pivot;
  bool mu_free, ls_free;  // inside the clip range: the gradient passes
};

Unit make_unit(double mu_raw, double ls_raw, double a, double b) {
  Unit u;
  u.mu_free = mu_raw > kParamLo && mu_raw < kParamHi;
  u.ls_free = ls_raw > kParamLo && ls_raw < kParamHi;
  u.mu = std::min(std::max(mu_raw, kParamLo), kParamHi);
  u.log_sigma = std::min(std::max(ls_raw, kParamLo), kParamHi);
  u.sigma = std::exp(u.log_sigma);
  u.f = make_frame((a - u.mu) / u.sigma, (b - u.mu) / u.sigma);
  u.sign = u.f.flip ? -1.0 : 1.0;
  u.pivot = u.f.flip ? a : b;
  return u;
}

// KL of one unit (log_width = log(b − a)) and its gradients in μ and log σ.
double kl_unit(const Unit& u, double log_width, double* dmu, double* dls) {
  const Frame& f = u.f;
  const double P = f.P, Q = f.Q, e = f.E_P, v = f.V_P;
  const double cross = (Q * f.m_Q - P * f.m_P) * f.eD / f.q;
  const double T = 0.5 * (Q * f.r_Q - P * f.r_P);
  double kl, dP;
  if (f.lower) {
    kl = -u.log_sigma + kLogSqrt2Pi - f.h_P - f.log_q + 0.5 * P * e - 0.5 * cross;
    dP = 0.5 * f.r_P * (cross - e * e - v);
  } else {
    kl = -u.log_sigma - f.log_ndtr_P - f.log_q - T;
    dP = f.r_P * (T - 0.5 * (1 + P * P));
  }
  const double dQ = 0.5 * f.r_Q * (1 + Q * Q - 2 * T);
  *dmu = u.mu_free ? -u.sign * (dP + dQ) / u.sigma : 0.0;
  *dls = u.ls_free ? -1 - P * dP - Q * dQ : 0.0;
  return kl + log_width - 0.5 * std::log(2 * M_PI * M_E);
}

void check_params(const at::Tensor& mu, const at::Tensor& log_sigma, const char* op) {
  TORCH_CHECK(mu.dim() == 1 && log_sigma.sizes() == mu.sizes(), op,
              ": mu and log_sigma must be 1-D of one shape, got ", mu.sizes(), " and ",
              log_sigma.sizes());
  TORCH_CHECK(mu.scalar_type() == log_sigma.scalar_type(), op,
              ": mu and log_sigma must have one dtype, got ", mu.scalar_type(), " and ",
              log_sigma.scalar_type());
  TORCH_CHECK(at::isFloatingType(mu.scalar_type()), op, ": expected floating-point parameters, got ",
              mu.scalar_type());
}

// The parameters as doubles, NaN rejected.
void read_params(const at::Tensor& mu, const at::Tensor& log_sigma, const char* op,
                 std::vector<double>* m, std::vector<double>* s) {
  const auto n = mu.numel();
  m->resize(n);
  s->resize(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "sbp_read_params", [&] {
    const auto mc = mu.contiguous(), sc = log_sigma.contiguous();
    const scalar_t* mp = mc.const_data_ptr<scalar_t>();
    const scalar_t* sp = sc.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      (*m)[i] = double(mp[i]);
      (*s)[i] = double(sp[i]);
      TORCH_CHECK(!std::isnan((*m)[i]) && !std::isnan((*s)[i]), op, ": mu or log_sigma contains NaN");
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sbp_kl_cpu(const at::Tensor& mu, const at::Tensor& log_sigma,
                                                          double a, double b) {
  constexpr const char* op = "sbp_kl";
  check_params(mu, log_sigma, op);
  TORCH_CHECK(std::isfinite(a) && std::isfinite(b) && a < b, op, ": bounds must be finite with a < b, got ",
              a, " and ", b);
  std::vector<double> m, s;
  read_params(mu, log_sigma, op, &m, &s);
  const int64_t n = mu.numel();
  const double log_width = std::log(b - a);
  std::vector<double> dm(n), ds(n);
  double total = 0;  // in unit order: the same bits every call
  for (int64_t i = 0; i < n; ++i) total += kl_unit(make_unit(m[i], s[i], a, b), log_width, &dm[i], &ds[i]);
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto dmu = at::empty({n}, opts), dls = at::empty({n}, opts);
  std::copy(dm.begin(), dm.end(), dmu.mutable_data_ptr<double>());
  std::copy(ds.begin(), ds.end(), dls.mutable_data_ptr<double>());
  const auto acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {at::scalar_tensor(total, at::TensorOptions().dtype(acc)), dmu.to(mu.scalar_type()),
          dls.to(log_sigma.scalar_type())};
}

// ---- per element, float lanes or double ------------------------------------------------------

// The element math is written once for V = vm::vec<W> (float lanes) or double; these pick
// the matching functions. Comparisons only feed `?:` selects, as in vec_math.h.
template <typename V>
constexpr int kLanes = int(sizeof(V) / sizeof(float));

template <typename V>
SPARSEVD_INLINE V vexp(V x) {
  if constexpr (std::is_same_v<V, double>) {
    return std::exp(x);
  } else {
    return vm::exp<kLanes<V>>(x);
  }
}

template <typename V>
SPARSEVD_INLINE V vlog(V x) {
  if constexpr (std::is_same_v<V, double>) {
    return std::log(x);
  } else {
    return vm::log<kLanes<V>>(x);
  }
}

// √x; for lanes as x·rsqrt(x), a bit-level first guess and three Newton steps (the
// generic vector extension has no sqrt), exact 0 at 0.
template <typename V>
SPARSEVD_INLINE V vsqrt(V x) {
  if constexpr (std::is_same_v<V, double>) {
    return std::sqrt(x);
  } else {
    using I = vm::ivec<kLanes<V>>;
    V r = vm::bit_cast<V>(I{} + 0x5f3759df - (vm::bit_cast<I>(x) >> 1));
    for (int i = 0; i < 3; ++i) r = r * (1.5f - 0.5f * x * r * r);
    return x > V{} ? x * r : V{};
  }
}

// log1p; for lanes by Goldberg's correction log(1 + x)·x/((1 + x) − 1), which cancels the
// rounding of 1 + x.
template <typename V>
SPARSEVD_INLINE V vlog1p(V x) {
  if constexpr (std::is_same_v<V, double>) {
    return std::log1p(x);
  } else {
    const V one = V{} + 1.0f;
    const V w = one + x;
    const V d = w - one;
    return d == V{} ? x : vlog(w) * (x / (d == V{} ? one : d));
  }
}

// expm1; for lanes the Taylor polynomial to degree 8 below 0.5 in magnitude (error < 4e-9
// relative), exp − 1 above.
template <typename V>
SPARSEVD_INLINE V vexpm1(V x) {
  if constexpr (std::is_same_v<V, double>) {
    return std::expm1(x);
  } else {
    V p = x * (1.0f / 40320) + (1.0f / 5040);
    p = p * x + (1.0f / 720);
    p = p * x + (1.0f / 120);
    p = p * x + (1.0f / 24);
    p = p * x + (1.0f / 6);
    p = p * x + 0.5f;
    p = p * x * x + x;
    const V ax = x < V{} ? -x : x;
    return ax < V{} + 0.5f ? p : vexp(x) - 1.0f;
  }
}

// v in the element type (rounded to float for lanes).
template <typename V>
SPARSEVD_INLINE V splat_as(V, double v) {
  if constexpr (std::is_same_v<V, double>) {
    return v;
  } else {
    return V{} + float(v);
  }
}

// Φ⁻¹(p) for p ≤ ½ (Acklam; relative error 1.2e-9 over the range used, p ≥ 2.9e-12). Its
// rational functions cancel to 1.6e-6 (tail) and 1e-4 (centre) in float arithmetic, so
// lanes evaluate them in double: ξ then carries float rounding only (2.4e-7 against
// torch.special.ndtri's 6e-7 in float32, measured over p ∈ [1e-10, 0.024]).
template <typename V>
SPARSEVD_INLINE V ndtri_lower(V p) {
  using D = vm::dvec<kLanes<V>>;
  const V low = splat_as(p, 0.02425);
  const D q = __builtin_convertvector(vsqrt(-2.0f * vlog(p < low ? p : low)), D);
  D num = q * -7.784894002430293e-03 - 3.223964580411365e-01;
  num = num * q - 2.400758277161838e+00;
  num = num * q - 2.549732539343734e+00;
  num = num * q + 4.374664141464968e+00;
  num = num * q + 2.938163982698783e+00;
  D den = q * 7.784695709041462e-03 + 3.224671290700398e-01;
  den = den * q + 2.445134137142996e+00;
  den = den * q + 3.754408661907416e+00;
  den = den * q + 1.0;
  const D c = __builtin_convertvector(p, D) - 0.5;
  const D r = c * c;
  D cn = r * -3.969683028665376e+01 + 2.209460984245205e+02;
  cn = cn * r - 2.759285104469687e+02;
  cn = cn * r + 1.383577518672690e+02;
  cn = cn * r - 3.066479806614716e+01;
  cn = cn * r + 2.506628277459239e+00;
  D cd = r * -5.447609879822406e+01 + 1.615858368580409e+02;
  cd = cd * r - 1.556989798598866e+02;
  cd = cd * r + 6.680131188771972e+01;
  cd = cd * r - 1.328068155288572e+01;
  cd = cd * r + 1.0;
  return p < low ? __builtin_convertvector(num / den, V) : __builtin_convertvector(cn * c / cd, V);
}

// The double version: Acklam (with exact double coefficients) and one Halley step.
template <>
SPARSEVD_INLINE double ndtri_lower<double>(double p) {
  double x;
  if (p < 0.02425) {
    const double q = std::sqrt(-2 * std::log(p));
    x = (((((-7.784894002430293e-03 * q - 3.223964580411365e-01) * q - 2.400758277161838e+00) * q -
           2.549732539343734e+00) * q + 4.374664141464968e+00) * q + 2.938163982698783e+00) /
        ((((7.784695709041462e-03 * q + 3.224671290700398e-01) * q + 2.445134137142996e+00) * q +
          3.754408661907416e+00) * q + 1);
  } else {
    const double c = p - 0.5, r = c * c;
    x = (((((-3.969683028665376e+01 * r + 2.209460984245205e+02) * r - 2.759285104469687e+02) * r +
           1.383577518672690e+02) * r - 3.066479806614716e+01) * r + 2.506628277459239e+00) * c /
        (((((-5.447609879822406e+01 * r + 1.615858368580409e+02) * r - 1.556989798598866e+02) * r +
           6.680131188771972e+01) * r - 1.328068155288572e+01) * r + 1);
  }
  const double e = 0.5 * std::erfc(-x * kSqrtHalf) - p;
  const double t = e * std::exp(0.5 * x * x + kLogSqrt2Pi);
  return x - t / (1 + 0.5 * x * t);
}

// (h(−y − δ) − h(−y), φ/Φ at −y − δ) by the continued fraction at both points with the
// recursion of their difference (sparsevd.reference._log_mills_step).
template <typename V>
SPARSEVD_INLINE V log_mills_step(V y, V delta, int depth, V* m_x) {
  const V yx = y + delta;
  V dp = y, dx = yx, dd = delta;
  for (int k = depth; k >= 1; --k) {
    const V rp = 1.0f / dp, rx = 1.0f / dx;
    const float kk = float(k + 1);
    dd = delta - kk * dd * rx * rp;
    dp = y + kk * rp;
    dx = yx + kk * rx;
  }
  const V rp = 1.0f / dp, rx = 1.0f / dx;
  *m_x = yx + rx;
  return -vlog1p((delta - dd * rx * rp) / (y + rp));
}

// The per-unit constants of the sampler in the element type, in the order of `order` (the
// units sorted by P, so that lane groups take one path and tail groups have similar y),
// padded to whole lane groups.
template <typename T>
struct Consts {
  std::vector<T> mu, ss, P, Q, eD, q, hPQ, cdfP, sfP, pivot, flip, gmu, gls;
  std::vector<uint8_t> tail;
  std::vector<int64_t> order;
  void resize(int64_t n) {
    for (auto* v : {&mu, &ss, &P, &Q, &eD, &q, &hPQ, &cdfP, &sfP, &pivot, &flip, &gmu, &gls}) v->assign(n, T(0));
    tail.assign(n, 0);
  }
};

template <typename T>
Consts<T> sample_consts(const std::vector<double>& m, const std::vector<double>& s, double a, double b,
                        int64_t padded) {
  const int64_t n = int64_t(m.size());
  std::vector<Unit> units;
  units.reserve(n);
  for (int64_t i = 0; i < n; ++i) units.push_back(make_unit(m[i], s[i], a, b));
  Consts<T> c;
  c.order.resize(n);
  for (int64_t i = 0; i < n; ++i) c.order[i] = i;
  std::stable_sort(c.order.begin(), c.order.end(),
                   [&](int64_t x, int64_t y) { return units[x].f.P < units[y].f.P; });
  c.resize(padded);
  const Unit pad = make_unit(-10.0, 0.0, a, b);  // padding lanes: a harmless unit, results discarded
  for (int64_t i = 0; i < padded; ++i) {
    const Unit& u = i < n ? units[c.order[i]] : pad;
    const Frame& f = u.f;
    c.mu[i] = T(u.mu);
    c.ss[i] = T(u.sign * u.sigma);
    c.P[i] = T(f.P);
    c.Q[i] = T(f.Q);
    c.eD[i] = T(f.eD);
    c.q[i] = T(f.q);
    c.hPQ[i] = T(f.h_P - f.h_Q);
    c.cdfP[i] = T(0.5 * std::erfc(-f.P * kSqrtHalf));
    c.sfP[i] = T(0.5 * std::erfc(f.P * kSqrtHalf));
    c.pivot[i] = T(u.pivot);
    c.flip[i] = T(f.flip ? 1 : 0);
    c.gmu[i] = T(u.mu_free ? 1 : 0);
    c.gls[i] = T(u.ls_free ? 1 : 0);
    c.tail[i] = f.P < -kTail;
  }
  return c;
}

template <typename V>
struct Lanes {
  V mu, ss, P, Q, eD, q, hPQ, cdfP, sfP, pivot, flip, gmu, gls;
};

// θ, ∂θ/∂μ, ∂θ/∂log σ at uniforms u for one lane group of units (see the file comment).
// any_body/any_tail: whether any lane takes each path; depth and newton: the continued
// fraction's depth and the Newton steps that the smallest tail y of the lanes needs.
template <typename V, bool kGrad>
SPARSEVD_INLINE void sample_lanes(V u_raw, const Lanes<V>& k, bool any_body, bool any_tail, V tail_mask, int depth,
                                  int newton, double a, double b, V* theta, V* dmu, V* dls) {
  const V zero{}, one = zero + 1.0f;
  // the clip constants rounded to the element type, as torch.clamp rounds them
  const V lo_u = splat_as(zero, kUClip), hi_u = splat_as(zero, 1 - kUClip);
  V u = u_raw < lo_u ? lo_u : u_raw;
  u = u > hi_u ? hi_u : u;
  const V flip = k.flip > zero ? one : zero;
  const V u1 = flip > zero ? one - u : u;  // u in the mirrored frame, and 1 − u without rounding twice
  const V v = flip > zero ? u : one - u;
  const V w = u1 + v * k.eD;
  V x = zero, dx_mu = zero, dx_ls = zero;
  if (any_body) {
    const V p = k.cdfP * w;
    const V pc = k.sfP + k.cdfP * v * k.q;
    const V upper = p > zero + 0.5f ? one : zero;
    const V z = ndtri_lower(upper > zero ? pc : p);
    const V xi = upper > zero ? -z : z;
    x = k.mu + k.ss * xi;
    if constexpr (kGrad) {
      const V A = vexp(vlog(v) + 0.5f * (xi - k.Q) * (xi + k.Q));
      const V B = vexp(vlog(u1) + 0.5f * (xi - k.P) * (xi + k.P));
      dx_mu = one - A - B;
      dx_ls = xi - k.Q * A - k.P * B;
    }
  }
  if (any_tail) {
    const V y = tail_mask > zero ? -k.P : zero + float(kTail);
    const V L = u1 < zero + 0.5f ? -vlog(w) : -vlog1p(-v * k.q);
    V delta = 2.0f * L / (y + vsqrt(y * y + 2.0f * L));
    V m_x;
    for (int i = 0; i < newton; ++i) {
      const V dh = log_mills_step(y, delta, depth, &m_x);
      delta = delta - (delta * (y + 0.5f * delta) - L - dh) / m_x;
    }
    const V dh = log_mills_step(y, delta, depth, &m_x);
    const V x_t = k.pivot - k.ss * delta;
    x = tail_mask > zero ? x_t : x;
    if constexpr (kGrad) {
      const V A = v * k.eD / w * vexp(k.hPQ + dh);
      const V omB = (v * k.eD - u1 * vexpm1(dh)) / w;
      dx_mu = tail_mask > zero ? omB - A : dx_mu;
      dx_ls = tail_mask > zero ? -delta + k.P * omB - k.Q * A : dx_ls;
    }
  }
  const V av = splat_as(zero, a), bv = splat_as(zero, b);
  x = x < av ? av : x;
  x = x > bv ? bv : x;
  *theta = vexp(x);
  if constexpr (kGrad) {
    *dmu = *theta * dx_mu * k.gmu;
    *dls = *theta * k.ss * dx_ls * k.gls;
  }
}

// Rows [r0, r1) of the float sample, W lanes at a time over the sorted units; each row's
// uniforms are gathered into that order and the results scattered back.
template <int W, bool kGrad>
SPARSEVD_INLINE void sample_rows_float(const Consts<float>& c, const float* u, float* th, float* dm, float* dl,
                                       int64_t units, int64_t r0, int64_t r1, double a, double b) {
  using V = vm::vec<W>;
  const int64_t groups = (units + W - 1) / W, padded = groups * W;
  std::vector<float> uu(padded, 0.5f), tt(padded), t1(kGrad ? padded : 0), t2(kGrad ? padded : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const float* ur = u + r * units;
    for (int64_t j = 0; j < units; ++j) uu[j] = ur[c.order[j]];
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t j = g * W;
      Lanes<V> k;
      k.mu = vm::load<W>(&c.mu[j]);
      k.ss = vm::load<W>(&c.ss[j]);
      k.P = vm::load<W>(&c.P[j]);
      k.Q = vm::load<W>(&c.Q[j]);
      k.eD = vm::load<W>(&c.eD[j]);
      k.q = vm::load<W>(&c.q[j]);
      k.hPQ = vm::load<W>(&c.hPQ[j]);
      k.cdfP = vm::load<W>(&c.cdfP[j]);
      k.sfP = vm::load<W>(&c.sfP[j]);
      k.pivot = vm::load<W>(&c.pivot[j]);
      k.flip = vm::load<W>(&c.flip[j]);
      k.gmu = vm::load<W>(&c.gmu[j]);
      k.gls = vm::load<W>(&c.gls[j]);
      float tm[W];
      int tails = 0;
      double y_min = 1e300;  // the units are sorted by P: the first tail lane has the smallest y
      for (int l = 0; l < W; ++l) {
        tm[l] = c.tail[j + l] ? 1.0f : 0.0f;
        tails += c.tail[j + l];
        if (c.tail[j + l]) y_min = std::min(y_min, -double(c.P[j + l]));
      }
      V t, d1, d2;
      sample_lanes<V, kGrad>(vm::load<W>(&uu[j]), k, tails < W, tails > 0, vm::load<W>(tm), cf_depth_float(y_min),
                             newton_steps_float(y_min), a, b, &t, &d1, &d2);
      vm::store<W>(&tt[j], t);
      if constexpr (kGrad) {
        vm::store<W>(&t1[j], d1);
        vm::store<W>(&t2[j], d2);
      }
    }
    for (int64_t j = 0; j < units; ++j) {
      const int64_t o = r * units + c.order[j];
      th[o] = tt[j];
      if constexpr (kGrad) {
        dm[o] = t1[j];
        dl[o] = t2[j];
      }
    }
  }
}

using FloatRowsFn = void (*)(const Consts<float>&, const float*, float*, float*, float*, int64_t, int64_t,
                             int64_t, double, double);

#if SPARSEVD_X86
template <bool kGrad>
SPARSEVD_TARGET_AVX512 void sample_rows_avx512(const Consts<float>& c, const float* u, float* th, float* dm,
                                               float* dl, int64_t units, int64_t r0, int64_t r1, double a,
                                               double b) {
  sample_rows_float<16, kGrad>(c, u, th, dm, dl, units, r0, r1, a, b);
}
template <bool kGrad>
SPARSEVD_TARGET_AVX2 void sample_rows_avx2(const Consts<float>& c, const float* u, float* th, float* dm,
                                           float* dl, int64_t units, int64_t r0, int64_t r1, double a, double b) {
  sample_rows_float<8, kGrad>(c, u, th, dm, dl, units, r0, r1, a, b);
}
#endif
template <bool kGrad>
void sample_rows_portable(const Consts<float>& c, const float* u, float* th, float* dm, float* dl,
                          int64_t units, int64_t r0, int64_t r1, double a, double b) {
  sample_rows_float<4, kGrad>(c, u, th, dm, dl, units, r0, r1, a, b);
}

// (lane width, the row function) for this CPU.
template <bool kGrad>
std::pair<int, FloatRowsFn> pick_rows() {
#if SPARSEVD_X86
  switch (vm::cpu_isa()) {
    case vm::Isa::kAvx512: return {16, &sample_rows_avx512<kGrad>};
    case vm::Isa::kAvx2: return {8, &sample_rows_avx2<kGrad>};
    default: break;
  }
#endif
  return {4, &sample_rows_portable<kGrad>};
}

template <bool kGrad>
void sample_rows_double(const Consts<double>& c, const float* u, double* th, double* dm, double* dl,
                        int64_t units, int64_t r0, int64_t r1, double a, double b) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < units; ++j) {
      const Lanes<double> k{c.mu[j], c.ss[j], c.P[j],     c.Q[j],    c.eD[j],  c.q[j],  c.hPQ[j],
                            c.cdfP[j], c.sfP[j], c.pivot[j], c.flip[j], c.gmu[j], c.gls[j]};
      const bool tail = c.tail[j];
      const int64_t o = r * units + c.order[j];
      double t, d1 = 0, d2 = 0;
      sample_lanes<double, kGrad>(double(u[o]), k, !tail, tail, tail ? 1.0 : 0.0, cf_depth_double(-c.P[j]),
                                  kNewtonDouble, a, b, &t, &d1, &d2);
      th[o] = t;
      if constexpr (kGrad) {
        dm[o] = d1;
        dl[o] = d2;
      }
    }
  }
}

int64_t seed_value(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
              ": seed must be a one-element int64 CPU tensor, got ", seed.scalar_type(), " ", seed.sizes(),
              " on ", seed.device());
  return seed.item<int64_t>();
}

// Bit for bit sparsevd.noise.uniform_from_seed(batch, units, seed, "cpu").
at::Tensor uniforms(int64_t batch, int64_t units, int64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(
      static_cast<uint64_t>(seed & std::numeric_limits<int64_t>::max()));
  return at::rand({batch, units}, gen, at::TensorOptions().dtype(at::kFloat));
}

at::Tensor sbp_noise_cpu(const at::Tensor& mu, const at::Tensor& seed, int64_t batch) {
  TORCH_CHECK(mu.dim() == 1, "sbp_noise: mu must be 1-D, got ", mu.sizes());
  TORCH_CHECK(batch >= 0, "sbp_noise: batch must be ≥ 0, got ", batch);
  return uniforms(batch, mu.size(0), seed_value(seed, "sbp_noise"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sbp_sample_cpu(const at::Tensor& mu, const at::Tensor& log_sigma,
                                                              const at::Tensor& seed, int64_t batch, double a,
                                                              double b, bool with_grad) {
  constexpr const char* op = "sbp_sample";
  check_params(mu, log_sigma, op);
  TORCH_CHECK(batch >= 0, op, ": batch must be ≥ 0, got ", batch);
  TORCH_CHECK(std::isfinite(a) && std::isfinite(b) && a < b, op, ": bounds must be finite with a < b, got ", a,
              " and ", b);
  std::vector<double> m, s;
  read_params(mu, log_sigma, op, &m, &s);
  const int64_t units = mu.numel();
  const auto u = uniforms(batch, units, seed_value(seed, op));
  const bool is_double = mu.scalar_type() == at::kDouble;
  const auto opts = at::TensorOptions().dtype(is_double ? at::kDouble : at::kFloat);
  auto theta = at::empty({batch, units}, opts);
  auto dmu = at::empty({with_grad ? batch : 0, with_grad ? units : 0}, opts);
  auto dls = at::empty({with_grad ? batch : 0, with_grad ? units : 0}, opts);
  if (batch == 0 || units == 0) return {theta, with_grad ? dmu : dmu.view({0}), with_grad ? dls : dls.view({0})};
  const float* up = u.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / units);  // small samples stay on the calling thread
  if (is_double) {
    const auto c = sample_consts<double>(m, s, a, b, units);
    double *tp = theta.mutable_data_ptr<double>(), *dp = with_grad ? dmu.mutable_data_ptr<double>() : nullptr,
           *lp = with_grad ? dls.mutable_data_ptr<double>() : nullptr;
    at::parallel_for(0, batch, grain, [&](int64_t r0, int64_t r1) {
      if (with_grad) {
        sample_rows_double<true>(c, up, tp, dp, lp, units, r0, r1, a, b);
      } else {
        sample_rows_double<false>(c, up, tp, dp, lp, units, r0, r1, a, b);
      }
    });
  } else {
    const auto [width, rows] = with_grad ? pick_rows<true>() : pick_rows<false>();
    const auto c = sample_consts<float>(m, s, a, b, (units + width - 1) / width * width);
    float *tp = theta.mutable_data_ptr<float>(), *dp = with_grad ? dmu.mutable_data_ptr<float>() : nullptr,
          *lp = with_grad ? dls.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, batch, grain, [&, rows = rows](int64_t r0, int64_t r1) {
      rows(c, up, tp, dp, lp, units, r0, r1, a, b);
    });
  }
  if (!with_grad) return {theta, dmu.view({0}), dls.view({0})};
  return {theta, dmu, dls};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) {
  m.impl("sbp_kl", &sbp_kl_cpu);
  m.impl("sbp_sample", &sbp_sample_cpu);
  m.impl("sbp_noise", &sbp_noise_cpu);
}

}  // namespace sparsevd
