// Portable SIMD float math for the CPU kernels, and the per-ISA dispatch they share.
//
// The kernels are written once with GCC/Clang vector extensions (`vec<W>`: W floats)
// and instantiated per instruction set inside functions that carry a target attribute
// (SPARSEVD_TARGET_AVX512 / SPARSEVD_TARGET_AVX2); the helpers here are always_inline
// so they take the caller's instruction set. `cpu_isa()` picks the widest set both the
// CPU and ATen's own dispatch (ATEN_CPU_CAPABILITY) allow, once. Everything compiles on
// any target: on non-x86 only the portable instantiation exists (NEON on aarch64).
//
// exp and log are Cephes-style polynomials (max error ~1-2 ulp on the ranges used),
// branch-free, with no libm calls, so the compiler keeps them in vector registers.
// NaN propagates through both (a NaN input gives a NaN output, never a finite value).
#pragma once

#include <ATen/Version.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // wide vectors passed between inlined helpers
#endif

#define SPARSEVD_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(_M_X64)
#define SPARSEVD_X86 1
#define SPARSEVD_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define SPARSEVD_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define SPARSEVD_X86 0
#endif

namespace sparsevd {
namespace vm {

template <int W>
struct VecTypes {
  typedef float f __attribute__((vector_size(W * sizeof(float))));
  typedef int32_t i __attribute__((vector_size(W * sizeof(int32_t))));
  typedef double d __attribute__((vector_size(W * sizeof(double))));
};
template <int W>
using vec = typename VecTypes<W>::f;
template <int W>
using ivec = typename VecTypes<W>::i;
template <int W>
using dvec = typename VecTypes<W>::d;

template <typename To, typename From>
SPARSEVD_INLINE To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast of different sizes");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

template <int W>
SPARSEVD_INLINE vec<W> splat(float v) {
  return vec<W>{} + v;
}

template <int W>
SPARSEVD_INLINE vec<W> load(const float* p) {
  vec<W> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
SPARSEVD_INLINE void store(float* p, vec<W> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <int W>
struct HalfVec {
  typedef uint16_t u __attribute__((vector_size(W * sizeof(uint16_t))));
};

// Load W values of any floating type as floats (bfloat16 by shifting, others per lane).
template <int W, typename T>
SPARSEVD_INLINE vec<W> load_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load<W>(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    typename HalfVec<W>::u h;
    std::memcpy(&h, p, sizeof(h));
    return bit_cast<vec<W>>(__builtin_convertvector(h, ivec<W>) << 16);
  } else {
    float tmp[W];
    for (int j = 0; j < W; ++j) tmp[j] = static_cast<float>(p[j]);
    return load<W>(tmp);
  }
}

template <int W, typename T>
SPARSEVD_INLINE void store_from_float(T* p, vec<W> v) {
  if constexpr (std::is_same_v<T, float>) {
    store<W>(p, v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // c10's round to nearest even, NaN → 0x7FC0, lane-parallel
    typedef uint32_t U __attribute__((vector_size(W * sizeof(uint32_t))));
    const U b = bit_cast<U>(v);
    U r = (b + (((b >> 16) & 1u) + 0x7FFFu)) >> 16;
    r = v != v ? (U{} + 0x7FC0u) : r;
    const typename HalfVec<W>::u h = __builtin_convertvector(r, typename HalfVec<W>::u);
    std::memcpy(p, &h, sizeof(h));
  } else {
    float tmp[W];
    store<W>(tmp, v);
    for (int j = 0; j < W; ++j) p[j] = static_cast<T>(tmp[j]);
  }
}

// e^x. Inputs are clamped to [-87, 88] (results stay normal floats: ~1.6e-38 to
// ~1.7e38), which the kernels here never leave in a way that matters; NaN stays NaN.
template <int W>
SPARSEVD_INLINE vec<W> exp(vec<W> x) {
  using F = vec<W>;
  using I = ivec<W>;
  const F lo = splat<W>(-87.0f), hi = splat<W>(88.0f);
  x = x < lo ? lo : x;  // comparisons with NaN are false: NaN kept
  x = x > hi ? hi : x;
  // n = round(x / ln 2) through the 1.5·2^23 trick; its integer is in the low bits.
  const float magic = 12582912.0f;
  const F t = x * 1.44269504088896341f + magic;
  const F n = t - magic;
  const I ni = bit_cast<I>(t) - bit_cast<int32_t>(magic);
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const F z = r * r;
  F y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const F pow2n = bit_cast<F>((ni + 127) << 23);
  return y * pow2n;  // NaN x: y is NaN
}

// Natural log for x > 0 normal (the kernels call it on θ² + 1e-8 ≥ 1e-8 and on
// 1 + e ∈ [1, 2]); +inf gives +inf, NaN gives NaN.
template <int W>
SPARSEVD_INLINE vec<W> log(vec<W> x) {
  using F = vec<W>;
  using I = ivec<W>;
  const I bits = bit_cast<I>(x);
  // x = m · 2^e with m ∈ [0.5, 1)
  I e = (bits >> 23) - 126;
  F m = bit_cast<F>((bits & 0x007FFFFF) | 0x3F000000);
  // (comparisons only feed selects: used as values, GCC may lower them lane by lane)
  const F sqrt_half = splat<W>(0.707106781186547524f);
  e = m < sqrt_half ? e - 1 : e;
  m = (m < sqrt_half ? m + m : m) - 1.0f;
  const F ef = __builtin_convertvector(e, F);
  const F z = m * m;
  F y = 7.0376836292e-2f * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + -2.12194440e-4f * ef;
  y = y - 0.5f * z;
  F r = m + y;
  r = r + 0.693359375f * ef;
  // finite positive x: r; +inf or NaN: x itself (the comparison is false for NaN)
  return x <= splat<W>(3.40282347e38f) ? r : x;
}

template <int W>
SPARSEVD_INLINE double hsum(dvec<W> v) {
  double s = 0;
  for (int j = 0; j < W; ++j) s += v[j];  // fixed order: deterministic
  return s;
}

// The instruction set the kernels run with, chosen once per process.
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
#if SPARSEVD_X86 && defined(__GNUC__)
  // ATen's choice honours ATEN_CPU_CAPABILITY (a user can force a narrower set);
  // the CPU check guards against a capability the machine lacks.
  const std::string cap = at::get_cpu_capability();
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl");
  if (cap == "AVX512" && avx512) return Isa::kAvx512;
  if ((cap == "AVX512" || cap == "AVX2") && avx2) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace vm
}  // namespace sparsevd

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
