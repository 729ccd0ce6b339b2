// Inner loops shared by the CPU kernels of csr_linear (csr_linear.cpp) and linear_chain
// (linear_chain.cpp). Everything is always_inline, instantiated inside each file's
// per-instruction-set entry points (vec_math.h's SPARSEVD_TARGET_* attributes), so one
// source is compiled once per instruction set.
//
// Layout. For a batch of M > 1 the input is packed, GEMM-style, into panels: batch block
// b (columns m0 .. m0 + W of the batch) becomes P_b [K][W], P_b[k][i] = x[m0 + i, k] in
// the accumulation type, zero beyond the batch. A non-zero w_rk then reads the W
// contiguous values P_b[k][:] and does W fused multiply-adds into register
// accumulators; the whole panel (K·W values) is sized to stay in L2 while a thread
// sweeps the rows of W, whatever M is. (An unpacked xᵀ [K, M] would put consecutive
// reads M·4 bytes apart: beyond a few hundred batch columns they use a fraction of the
// L2 sets and a page each, and the kernel fell off a cliff.)
//
// Bounds. Nothing here trusts the CSR structure: every row checks
// 0 <= crow[r] <= crow[r+1] <= nnz where it starts, every column index is checked
// against K (one unsigned compare) where it is read, and a kernel stops at the first
// bad index (it never reads through it) and reports it in a BadIndex. The caller
// raises after its parallel loop. The checks cost one predictable branch per non-zero
// (per four in the GEMV): 0-4 % of the AVX-512 SpMM, and the GEMV without them is no
// faster (bench/results/2026-11-30-cpu-csr.md).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../activations.h"
#include "vec_math.h"

#if SPARSEVD_X86
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on the gather intrinsics themselves
#endif
#endif

namespace sparsevd {
namespace csr {

// fp32 accumulation, fp64 for float64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t, typename scalar_t>
SPARSEVD_INLINE acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// One SIMD register of VB bytes (64: zmm, 32: ymm, 16: xmm / NEON) of acc_t, as a GCC/Clang
// vector. Loads and stores go through memcpy (unaligned moves).
template <typename acc_t, int VB>
struct Simd {
  typedef acc_t V __attribute__((vector_size(VB)));
  static constexpr int kLanes = VB / static_cast<int>(sizeof(acc_t));
};

template <typename V, typename acc_t>
SPARSEVD_INLINE V vload(const acc_t* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename acc_t>
SPARSEVD_INLINE void vstore(acc_t* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// VB bytes of acc_t from scalar_t values (float16 / bfloat16 widened).
template <typename V, typename scalar_t>
SPARSEVD_INLINE V load_acc(const scalar_t* p) {
  using acc_t = std::remove_reference_t<decltype(std::declval<V>()[0])>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return vload<V>(p);
  } else {
    return vm::load_as_float<static_cast<int>(sizeof(V) / sizeof(float))>(p);
  }
}

// Column indices are int32: every non-negative one is below 2^31.
SPARSEVD_INLINE uint32_t col_limit(int64_t K) {
  return static_cast<uint32_t>(std::min<int64_t>(K, int64_t(1) << 31));
}

// Non-zeros (or dense weights) per partial sum: long rows are summed in chunks
// (two-level summation), which keeps the rounding error near that of a blocked GEMM.
constexpr int64_t kSumChunk = 64;

// Target size of the panels a batch block keeps in L2, beside the CSR arrays that stream
// through it. On a Zen 4 core (1 MiB of L2), 4096 × 4096 at 98 %: 256-384 KiB (16-float
// blocks) are best; 512 KiB (32 floats) is 5-10 % slower, 1 MiB (64) 25-30 %.
constexpr int64_t kPanelBytes = int64_t(384) << 10;

// Below this many multiply-adds a call runs on the calling thread: waking the pool
// costs more than it saves. It is also the smallest task a call is cut into.
constexpr int64_t kSerialWork = int64_t(1) << 15;

// Tasks per thread when a call's work is shared out: threads claim them one at a time,
// so a thread that starts late finds its share done by the others.
constexpr int64_t kTasksPerThread = 4;

// Oversubscription. A parallel region ends when the last thread of its team has
// finished, and a thread that another process has taken the core from resumes only when
// the scheduler gives it back: on a machine where every core is busy, a 0.2 ms call can
// wait 20 ms for one descheduled thread. So tasks are claimed dynamically (the calling
// thread takes over the tasks of a thread that has not started), and a call whose
// calling thread then waited at the end longer than it computed marks the cores as
// contended, and so does one whose calling thread ran for less than half of its wall
// time (it was descheduled, or slept waiting): calls run on the calling thread alone for
// the next kContendedNs, then try the team again. The thread count itself is torch's
// (at::get_num_threads).
constexpr int64_t kContendedNs = 200'000'000;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// CPU time of the calling thread, or -1 where the platform has no such clock.
inline int64_t thread_cpu_ns() {
#if defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0) return int64_t(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
#endif
  return -1;
}

inline std::atomic<int64_t>& contended_until_ns() {
  static std::atomic<int64_t> until{0};
  return until;
}

// Whether `work` multiply-adds are shared among threads: enough of them, more than one
// thread, not inside a parallel region already, and no sign of contended cores.
inline bool share_work(int64_t work) {
  return work >= 2 * kSerialWork && at::get_num_threads() > 1 && !at::in_parallel_region() &&
         now_ns() >= contended_until_ns().load(std::memory_order_relaxed);
}

// The number of tasks to cut `work` into (at most `limit`): each at least kSerialWork,
// kTasksPerThread per thread.
inline int64_t task_count(int64_t work, int64_t limit) {
  return std::max<int64_t>(
      1, std::min({limit, work / kSerialWork, at::get_num_threads() * kTasksPerThread}));
}

// ---- bounds ------------------------------------------------------------------------------

// The first invalid index a kernel met. row < 0: none.
struct BadIndex {
  int64_t layer = 0;  // of a linear_chain
  int64_t row = -1;
  bool column = false;  // true: col_indices[pos] = value is outside [0, K)
  int64_t pos = 0;      // false: crow_indices[pos] = value, crow_indices[pos + 1] = next
  int64_t value = 0;
  int64_t next = 0;
  bool ok() const { return row < 0; }
};

// Row r's non-zeros are [start, end) if 0 <= start <= end <= nnz (unsigned compares:
// a negative index is huge). Otherwise records the row and returns false.
SPARSEVD_INLINE bool row_range(const int32_t* crow, int64_t r, uint32_t nnz, int64_t& start,
                               int64_t& end, BadIndex& bad) {
  const int32_t s = crow[r], e = crow[r + 1];
  if (__builtin_expect(static_cast<uint32_t>(s) > static_cast<uint32_t>(e) ||
                           static_cast<uint32_t>(e) > nnz,
                       0)) {
    bad.row = r;
    bad.column = false;
    bad.pos = r;
    bad.value = s;
    bad.next = e;
    return false;
  }
  start = s;
  end = e;
  return true;
}

SPARSEVD_INLINE void bad_column(BadIndex& bad, int64_t row, int64_t pos, int32_t value) {
  bad.row = row;
  bad.column = true;
  bad.pos = pos;
  bad.value = value;
}

// Raises the error for `bad` (which must not be ok()). `what` names the op and layer.
inline void raise_bad_index(const std::string& what, const BadIndex& bad, int64_t K,
                            int64_t nnz) {
  if (bad.column) {
    TORCH_CHECK_INDEX(false, what, ": col_indices[", bad.pos, "] = ", bad.value,
                      " (row ", bad.row, ") is outside [0, K = ", K, ")");
  }
  TORCH_CHECK(false, what, ": crow_indices must be non-decreasing within [0, nnz = ", nnz,
              "], got crow_indices[", bad.pos, "] = ", bad.value, " and crow_indices[",
              bad.pos + 1, "] = ", bad.next, " (row ", bad.row, ")");
}

// The first error (lowest layer, then row) of per-part records; ok() if none.
inline BadIndex first_bad(const std::vector<BadIndex>& parts) {
  BadIndex first;
  for (const auto& b : parts)
    if (!b.ok() && (first.ok() || b.layer < first.layer ||
                    (b.layer == first.layer && b.row < first.row)))
      first = b;
  return first;
}

// ---- activations -------------------------------------------------------------------------

// The codes of linear_chain are csrc/activations.h's table.
static_assert(kNumActs == 10, "a new activation in csrc/activations.h needs its SIMD form in activate()");

// float lanes. exp is vec_math's (NaN in, NaN out); erf is Abramowitz & Stegun 7.1.26
// (|error| < 1.5e-7), the form ATen's own vectorized CPU gelu uses. Comparisons are
// written so that NaN falls through to the NaN-propagating branch, as in torch.
template <int L>
SPARSEVD_INLINE vm::vec<L> activate(vm::vec<L> x, int64_t act, float p) {
  using F = vm::vec<L>;
  const F zero{}, one = vm::splat<L>(1.0f);
  switch (static_cast<Act>(act)) {
    case kIdentity:
    case kNumActs: return x;
    case kRelu: return x < zero ? zero : x;
    case kLeakyRelu: return x < zero ? x * p : x;
    case kRelu6: {
      const F six = vm::splat<L>(6.0f);
      const F lo = x < zero ? zero : x;
      return lo > six ? six : lo;
    }
    case kElu: return x > zero ? x : p * (vm::exp<L>(x) - 1.0f);
    case kTanh: {
      // tanh x = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): no overflow, NaN kept
      const F ax = x < zero ? -x : x;
      const F e = vm::exp<L>(-2.0f * ax);
      const F t = (one - e) / (one + e);
      return x < zero ? -t : t;
    }
    case kSigmoid: return one / (one + vm::exp<L>(-x));
    case kGelu: {
      const F z = x * 0.70710678118654752f;
      const F az = z < zero ? -z : z;
      const F t = one / (one + 0.3275911f * az);
      F poly = 1.061405429f * t - 1.453152027f;
      poly = poly * t + 1.421413741f;
      poly = poly * t - 0.284496736f;
      poly = poly * t + 0.254829592f;
      const F erf_abs = one - poly * t * vm::exp<L>(-az * az);
      const F erf = z < zero ? -erf_abs : erf_abs;
      return 0.5f * x * (one + erf);
    }
    case kGeluTanh: {
      const F u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      const F au = u < zero ? -u : u;
      const F e = vm::exp<L>(-2.0f * au);
      const F t0 = (one - e) / (one + e);
      const F t = u < zero ? -t0 : t0;
      return 0.5f * x * (one + t);
    }
    case kSilu: return x / (one + vm::exp<L>(-x));
  }
  return x;
}

// float64: libm, lane by lane (float64 is for tests and gradchecks, not speed).
SPARSEVD_INLINE double activate_scalar(double x, int64_t act, double p) {
  switch (act) {
#define SPARSEVD_ACT_SCALAR(NAME, PY_NAME, SCALAR, ATEN_INPLACE) \
  case NAME:                                                    \
    return SCALAR;
    SPARSEVD_ACTIVATIONS(SPARSEVD_ACT_SCALAR)
#undef SPARSEVD_ACT_SCALAR
  }
  return x;
}

// act(v) for one vector of acc_t.
template <typename V, typename acc_t>
SPARSEVD_INLINE V act_vec(V v, int64_t act, acc_t p) {
  if (act == kIdentity) return v;
  if constexpr (std::is_same_v<acc_t, float>) {
    constexpr int L = sizeof(V) / sizeof(float);
    return activate<L>(v, act, p);
  } else {
    constexpr int L = sizeof(V) / sizeof(double);
    for (int i = 0; i < L; ++i) v[i] = activate_scalar(v[i], act, p);
    return v;
  }
}

template <typename V, typename acc_t>
SPARSEVD_INLINE V bias_act(V v, acc_t b, int64_t act, acc_t p) {
  return act_vec(v + b, act, p);
}

// v[0:n] = act(v[0:n]) in place.
template <int VB, typename acc_t>
SPARSEVD_INLINE void act_inplace(acc_t* __restrict v, int64_t n, int64_t act, acc_t p) {
  using V = typename Simd<acc_t, VB>::V;
  constexpr int L = Simd<acc_t, VB>::kLanes;
  if (act == kIdentity) return;
  int64_t i = 0;
  for (; i + L <= n; i += L) vstore(v + i, act_vec(vload<V>(v + i), act, p));
  if (i < n) {
    acc_t tail[L] = {};
    std::memcpy(tail, v + i, (n - i) * sizeof(acc_t));
    const V t = act_vec(vload<V>(tail), act, p);
    std::memcpy(v + i, &t, (n - i) * sizeof(acc_t));
  }
}

// ---- M == 1: sparse and dense GEMV ---------------------------------------------------------

// out(r, Σ_j w_rj x[col_j]) for rows [r0, r1); x has K entries of in_t. Four chains for
// instruction-level parallelism, restarted every 4·kSumChunk non-zeros.
template <typename scalar_t, typename in_t, typename acc_t, typename Out>
SPARSEVD_INLINE bool gemv_rows(const int32_t* __restrict crow, const int32_t* __restrict col,
                               const scalar_t* __restrict val, uint32_t nnz,
                               const in_t* __restrict x, uint32_t K, int64_t r0, int64_t r1,
                               const Out& out, BadIndex& bad) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j, end;
    if (!row_range(crow, r, nnz, j, end, bad)) return false;
    acc_t sum = 0;
    while (j < end) {
      const int64_t stop = std::min<int64_t>(end, j + 4 * kSumChunk);
      acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (; j + 4 <= stop; j += 4) {
        const uint32_t c0 = col[j], c1 = col[j + 1], c2 = col[j + 2], c3 = col[j + 3];
        if (__builtin_expect(std::max(std::max(c0, c1), std::max(c2, c3)) >= K, 0)) break;
        a0 += to_acc<acc_t>(val[j]) * to_acc<acc_t>(x[c0]);
        a1 += to_acc<acc_t>(val[j + 1]) * to_acc<acc_t>(x[c1]);
        a2 += to_acc<acc_t>(val[j + 2]) * to_acc<acc_t>(x[c2]);
        a3 += to_acc<acc_t>(val[j + 3]) * to_acc<acc_t>(x[c3]);
      }
      for (; j < stop; ++j) {
        const uint32_t c = col[j];
        if (__builtin_expect(c >= K, 0)) {
          bad_column(bad, r, j, col[j]);
          return false;
        }
        a0 += to_acc<acc_t>(val[j]) * to_acc<acc_t>(x[c]);
      }
      sum += (a0 + a1) + (a2 + a3);
    }
    out(r, sum);
  }
  return true;
}

// out(r, Σ_k w[r, k] x[k]) for rows [r0, r1) of a dense row-major w [*, K].
template <int VB, typename scalar_t, typename acc_t, typename Out>
SPARSEVD_INLINE void dense_gemv_rows(const scalar_t* __restrict w, const acc_t* __restrict x,
                                     int64_t K, int64_t r0, int64_t r1, const Out& out) {
  using V = typename Simd<acc_t, VB>::V;
  constexpr int L = Simd<acc_t, VB>::kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* __restrict wr = w + r * K;
    V a0{}, a1{}, a2{}, a3{};
    int64_t k = 0;
    for (; k + 4 * L <= K; k += 4 * L) {
      a0 += load_acc<V>(wr + k) * vload<V>(x + k);
      a1 += load_acc<V>(wr + k + L) * vload<V>(x + k + L);
      a2 += load_acc<V>(wr + k + 2 * L) * vload<V>(x + k + 2 * L);
      a3 += load_acc<V>(wr + k + 3 * L) * vload<V>(x + k + 3 * L);
    }
    const V a = (a0 + a1) + (a2 + a3);
    acc_t sum = 0;
    for (int i = 0; i < L; ++i) sum += a[i];
    for (; k < K; ++k) sum += to_acc<acc_t>(wr[k]) * x[k];
    out(r, sum);
  }
}

#if SPARSEVD_X86
// Whether the float32 GEMV uses AVX-512 gathers (below): about twice the scalar loop's
// speed on Intel cores, but slower than scalar loads on AMD Zen 4, where a 16-lane gather
// is microcoded (300×784 at 98.9 %: 2.9 µs against 1.6 µs). SPARSEVD_CSR_GATHER=1 / 0
// overrides the choice by vendor (read once; the tests run both).
inline bool use_gathers() {
  static const bool gathers = [] {
    const char* env = std::getenv("SPARSEVD_CSR_GATHER");
    if (env != nullptr && (env[0] == '0' || env[0] == '1')) return env[0] == '1';
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return gathers;
}

// float32 GEMV with AVX-512 gathers, y[r] = Σ_j w_rj x[col_j] + b_r: 16 non-zeros per
// step (one load of 16 column indices, one of 16 values, one gather of x), 16 partial
// sums per row reduced at the end. About twice the scalar loop's speed at SparseVD
// densities. The indices are checked with one vector compare before a gather reads
// through them.
SPARSEVD_TARGET_AVX512 inline bool gemv_f32_avx512_gather(const int32_t* crow, const int32_t* col,
                                                          const float* val, uint32_t nnz,
                                                          const float* x, uint32_t K,
                                                          const float* bias, float* y,
                                                          int64_t r0, int64_t r1,
                                                          BadIndex& bad) {
  const __m512i limit = _mm512_set1_epi32(static_cast<int32_t>(K));
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j, end;
    if (!row_range(crow, r, nnz, j, end, bad)) return false;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; j + 32 <= end; j += 32) {
      const __m512i c0 = _mm512_loadu_si512(col + j);
      const __m512i c1 = _mm512_loadu_si512(col + j + 16);
      if (__builtin_expect(_mm512_cmpge_epu32_mask(c0, limit) |
                               _mm512_cmpge_epu32_mask(c1, limit),
                           0))
        break;  // the masked loop below finds it
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(val + j), _mm512_i32gather_ps(c0, x, 4), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(val + j + 16), _mm512_i32gather_ps(c1, x, 4), acc1);
    }
    for (; j < end; j += 16) {
      const int64_t left = end - j;
      const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
      const __m512i c = _mm512_maskz_loadu_epi32(m, col + j);
      const __mmask16 out = _mm512_mask_cmpge_epu32_mask(m, c, limit);
      if (__builtin_expect(out != 0, 0)) {
        const int64_t at = j + __builtin_ctz(out);
        bad_column(bad, r, at, col[at]);
        return false;
      }
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, c, x, 4);
      acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, val + j), xv, acc0);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    if (bias != nullptr) sum += bias[r];
    y[r] = sum;
  }
  return true;
}
#endif

// ---- M > 1: panels ---------------------------------------------------------------------

// The batch blocks of an M-column batch: full blocks of `vectors` SIMD vectors of
// `lanes` values, then one block only as wide as the remaining columns need: whole
// vectors, or half a vector when that is enough (half-width registers: a batch of 8
// floats under AVX-512 packs and multiplies 8 columns, not 16).
struct Blocks {
  int64_t M, lanes, width, count;
  bool half;  // whether half-vector blocks exist (not in the 16-byte portable build)
  Blocks(int64_t M_, int64_t lanes_, int64_t vectors, bool half_)
      : M(M_), lanes(lanes_), width(vectors * lanes_),
        count((M_ + vectors * lanes_ - 1) / (vectors * lanes_)), half(half_) {}
  int64_t m0(int64_t b) const { return b * width; }
  int64_t valid(int64_t b) const { return std::min(width, M - b * width); }
  int64_t panel_width(int64_t b) const {
    const int64_t v = valid(b);
    return half && 2 * v <= lanes ? lanes / 2 : (v + lanes - 1) / lanes * lanes;
  }
  // Whether `work` multiply-adds are shared out among threads by whole blocks (each
  // thread packs its own, nothing is shared): when there are enough blocks to balance.
  // Otherwise the rows are split (or the call stays on this thread).
  bool split_blocks(int64_t work) const {
    const int64_t threads = at::get_num_threads();
    return share_work(work) && count >= threads && (count % threads == 0 || count >= 4 * threads);
  }
};

#if SPARSEVD_X86
// Eight values of x as floats in a ymm register (AVX2 / AVX-512 builds only).
template <typename scalar_t>
SPARSEVD_INLINE SPARSEVD_TARGET_AVX2 __m256 load8_float(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// r[t][i] ← r[i][t]: the 8 × 8 transpose in registers.
SPARSEVD_INLINE SPARSEVD_TARGET_AVX2 void transpose8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// P[k][:] for k < the returned multiple of 8 (see pack_panel), rows of x contiguous
// along K, W a multiple of 8. A called function, not an inlined one: its instruction set
// is AVX2 whatever the caller's.
template <typename scalar_t>
SPARSEVD_TARGET_AVX2 int64_t pack_panel_t8(const scalar_t* __restrict x, int64_t sm, int64_t m0,
                                           int64_t valid, int64_t K, int64_t W,
                                           float* __restrict P) {
  int64_t k0 = 0;
  for (; k0 + 8 <= K; k0 += 8) {
    for (int64_t i0 = 0; i0 < W; i0 += 8) {
      __m256 r[8];
      for (int t = 0; t < 8; ++t)
        r[t] = i0 + t < valid ? load8_float(x + (m0 + i0 + t) * sm + k0) : _mm256_setzero_ps();
      transpose8(r);
      for (int t = 0; t < 8; ++t) _mm256_storeu_ps(P + (k0 + t) * W + i0, r[t]);
    }
  }
  return k0;
}
#endif

// P [K][W] ← x[m0 : m0 + valid, :] (strides sm, sk) in acc_t, columns valid..W zeroed.
// float panels of rows contiguous along K go through 8 × 8 register transposes in the
// AVX2 / AVX-512 builds (VB >= 32); the rest through 16 × 16 tiles that keep both sides
// in cache lines.
template <int VB, typename scalar_t, typename acc_t>
SPARSEVD_INLINE void pack_panel(const scalar_t* __restrict x, int64_t sm, int64_t sk, int64_t m0,
                                int64_t valid, int64_t K, int64_t W, acc_t* __restrict P) {
  int64_t k0 = 0;
#if SPARSEVD_X86
  if constexpr (VB >= 32 && std::is_same_v<acc_t, float>) {
    if (sk == 1 && W % 8 == 0) k0 = pack_panel_t8(x, sm, m0, valid, K, W, P);
  }
#endif
  constexpr int64_t T = 16;
  for (int64_t kb = k0; kb < K; kb += T) {
    const int64_t ke = std::min(kb + T, K);
    for (int64_t ib = 0; ib < valid; ib += T) {
      const int64_t ie = std::min(ib + T, valid);
      for (int64_t i = ib; i < ie; ++i) {
        const scalar_t* __restrict src = x + (m0 + i) * sm;
        for (int64_t k = kb; k < ke; ++k) P[k * W + i] = to_acc<acc_t>(src[k * sk]);
      }
    }
    if (valid < W)
      for (int64_t k = kb; k < ke; ++k)
        for (int64_t i = valid; i < W; ++i) P[k * W + i] = acc_t(0);
  }
}

// y[m0 + i, n] ← P[n][i] for i < valid, n < N (y contiguous [*, N]).
template <typename scalar_t, typename acc_t>
SPARSEVD_INLINE void unpack_panel(const acc_t* __restrict P, int64_t W, int64_t N, int64_t m0,
                                  int64_t valid, scalar_t* __restrict y) {
  constexpr int64_t T = 16;
  for (int64_t ib = 0; ib < valid; ib += T) {
    const int64_t ie = std::min(ib + T, valid);
    for (int64_t nb = 0; nb < N; nb += T) {
      const int64_t ne = std::min(nb + T, N);
      for (int64_t i = ib; i < ie; ++i) {
        scalar_t* __restrict dst = y + (m0 + i) * N;
        for (int64_t n = nb; n < ne; ++n) dst[n] = static_cast<scalar_t>(P[n * W + i]);
      }
    }
  }
}

// acc = Σ_{j in [start, end)} w_j · P[col_j][:] for a panel of NV vectors per row.
// Returns -1, or the position of the first column index outside [0, K) (acc is then
// meaningless). Narrow panels (NV < 4) run 4/NV independent chains so the FMA latency
// is hidden as with 4 accumulators.
template <int VB, int NV, typename scalar_t, typename acc_t>
SPARSEVD_INLINE int64_t spmm_sum(const int32_t* __restrict col, const scalar_t* __restrict val,
                                 const acc_t* __restrict P, uint32_t K, int64_t start,
                                 int64_t end, typename Simd<acc_t, VB>::V (&acc)[NV]) {
  using V = typename Simd<acc_t, VB>::V;
  constexpr int L = Simd<acc_t, VB>::kLanes;
  constexpr int64_t W = int64_t(NV) * L;
  constexpr int C = NV >= 4 ? 1 : 4 / NV;
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = V{};
  for (int64_t j = start; j < end;) {
    const int64_t stop = std::min<int64_t>(end, j + kSumChunk);
    V part[C][NV];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) part[c][v] = V{};
    for (; j + C <= stop; j += C) {
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const uint32_t k = col[j + c];
        if (__builtin_expect(k >= K, 0)) return j + c;
        const V w = V{} + to_acc<acc_t>(val[j + c]);
        const acc_t* __restrict p = P + int64_t(k) * W;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) part[c][v] += w * vload<V>(p + v * L);
      }
    }
    for (; j < stop; ++j) {
      const uint32_t k = col[j];
      if (__builtin_expect(k >= K, 0)) return j;
      const V w = V{} + to_acc<acc_t>(val[j]);
      const acc_t* __restrict p = P + int64_t(k) * W;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) part[0][v] += w * vload<V>(p + v * L);
    }
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] += part[c][v];
  }
  return -1;
}

// acc for row r against panel P, its range and column indices checked: false (and the
// first bad index in `bad`) if one is invalid.
template <int VB, int NV, typename scalar_t, typename acc_t>
SPARSEVD_INLINE bool spmm_row(const int32_t* __restrict crow, const int32_t* __restrict col,
                              const scalar_t* __restrict val, uint32_t nnz,
                              const acc_t* __restrict P, uint32_t K, int64_t r,
                              typename Simd<acc_t, VB>::V (&acc)[NV], BadIndex& bad) {
  int64_t start, end;
  if (!row_range(crow, r, nnz, start, end, bad)) return false;
  const int64_t at = spmm_sum<VB, NV>(col, val, P, K, start, end, acc);
  if (__builtin_expect(at >= 0, 0)) {
    bad_column(bad, r, at, col[at]);
    return false;
  }
  return true;
}

// Rows [r0, r1) of a CSR matrix against panel P [K][NV·L], written as runs of kRowTile
// contiguous outputs per batch row into y[m0 + i, r] (y [*, N]): a row of W is a column
// of y, and writing it directly would touch a cache line per output.
constexpr int64_t kRowTile = 16;

template <int VB, int NV, typename scalar_t, typename acc_t>
SPARSEVD_INLINE bool spmm_rows_to_y(const int32_t* __restrict crow, const int32_t* __restrict col,
                                    const scalar_t* __restrict val, uint32_t nnz,
                                    const acc_t* __restrict P, uint32_t K,
                                    const scalar_t* __restrict bias, int64_t m0, int64_t valid,
                                    int64_t N, scalar_t* __restrict y, int64_t r0, int64_t r1,
                                    BadIndex& bad) {
  using V = typename Simd<acc_t, VB>::V;
  constexpr int L = Simd<acc_t, VB>::kLanes;
  alignas(64) acc_t tile[NV * L][kRowTile];
  for (int64_t rb = r0; rb < r1; rb += kRowTile) {
    const int64_t re = std::min<int64_t>(rb + kRowTile, r1);
    for (int64_t r = rb; r < re; ++r) {
      V acc[NV];
      if (!spmm_row<VB, NV>(crow, col, val, nnz, P, K, r, acc, bad)) return false;
      const acc_t b = bias != nullptr ? to_acc<acc_t>(bias[r]) : acc_t(0);
      alignas(64) acc_t out[NV * L];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) vstore(out + v * L, acc[v] + b);
      for (int i = 0; i < NV * L; ++i) tile[i][r - rb] = out[i];
    }
    for (int64_t i = 0; i < valid; ++i) {
      scalar_t* __restrict yr = y + (m0 + i) * N + rb;
      for (int64_t rr = 0; rr < re - rb; ++rr) yr[rr] = static_cast<scalar_t>(tile[i][rr]);
    }
  }
  return true;
}

// Rows [r0, r1) of a CSR matrix against panel P [K][W] into the next panel
// Q[r][:] = act(acc + b_r) (W = NV·L contiguous values per row: one store per vector).
template <int VB, int NV, typename scalar_t, typename acc_t>
SPARSEVD_INLINE bool spmm_rows_to_panel(const int32_t* __restrict crow,
                                        const int32_t* __restrict col,
                                        const scalar_t* __restrict val, uint32_t nnz,
                                        const acc_t* __restrict P, uint32_t K,
                                        const scalar_t* __restrict bias, int64_t act, acc_t param,
                                        acc_t* __restrict Q, int64_t r0, int64_t r1,
                                        BadIndex& bad) {
  using V = typename Simd<acc_t, VB>::V;
  constexpr int L = Simd<acc_t, VB>::kLanes;
  for (int64_t r = r0; r < r1; ++r) {
    V acc[NV];
    if (!spmm_row<VB, NV>(crow, col, val, nnz, P, K, r, acc, bad)) return false;
    const acc_t b = bias != nullptr ? to_acc<acc_t>(bias[r]) : acc_t(0);
    acc_t* __restrict q = Q + r * (NV * L);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(q + v * L, bias_act(acc[v], b, act, param));
  }
  return true;
}

// Q[r][:] = act(Σ_k w[r, k] P[k][:] + b_r) for rows [r0, r1) of a dense row-major
// w [*, K]: a register-blocked GEMM micro-kernel (R rows × NV vectors of accumulators,
// one load of P[k] per R·NV FMAs), K in chunks of kDenseChunk whose partial sums are
// added in Q (two-level summation, and the rows' chunk of w stays in L1).
constexpr int64_t kDenseChunk = 256;

template <int VB, int NV, int R, typename scalar_t, typename acc_t>
SPARSEVD_INLINE void dense_rows_chunk(const scalar_t* __restrict w, int64_t K,
                                      const acc_t* __restrict P, int64_t k0, int64_t k1,
                                      bool first, acc_t* __restrict Q, int64_t r) {
  using V = typename Simd<acc_t, VB>::V;
  constexpr int L = Simd<acc_t, VB>::kLanes;
  constexpr int64_t W = int64_t(NV) * L;
  V acc[R][NV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (int64_t k = k0; k < k1; ++k) {
    V p[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) p[v] = vload<V>(P + k * W + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const V wi = V{} + to_acc<acc_t>(w[(r + i) * K + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] += wi * p[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    acc_t* __restrict q = Q + (r + i) * W;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      vstore(q + v * L, first ? acc[i][v] : vload<V>(q + v * L) + acc[i][v]);
  }
}

template <int VB, int NV, typename scalar_t, typename acc_t>
SPARSEVD_INLINE void dense_rows_to_panel(const scalar_t* __restrict w, int64_t K,
                                         const acc_t* __restrict P,
                                         const scalar_t* __restrict bias, int64_t act,
                                         acc_t param, acc_t* __restrict Q, int64_t r0,
                                         int64_t r1) {
  using V = typename Simd<acc_t, VB>::V;
  constexpr int L = Simd<acc_t, VB>::kLanes;
  constexpr int64_t W = int64_t(NV) * L;
  constexpr int R = NV >= 8 ? 2 : NV >= 4 ? 4 : 8;  // R·NV <= 16 accumulators
  if (K == 0) {
    for (int64_t r = r0; r < r1; ++r)
      for (int v = 0; v < NV; ++v) vstore(Q + r * W + v * L, V{});
  }
  for (int64_t k0 = 0; k0 < K; k0 += kDenseChunk) {
    const int64_t k1 = std::min(k0 + kDenseChunk, K);
    int64_t r = r0;
    for (; r + R <= r1; r += R) dense_rows_chunk<VB, NV, R, scalar_t>(w, K, P, k0, k1, k0 == 0, Q, r);
    for (; r < r1; ++r) dense_rows_chunk<VB, NV, 1, scalar_t>(w, K, P, k0, k1, k0 == 0, Q, r);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t b = bias != nullptr ? to_acc<acc_t>(bias[r]) : acc_t(0);
    acc_t* __restrict q = Q + r * W;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(q + v * L, bias_act(vload<V>(q + v * L), b, act, param));
  }
}

// Q[r][:] = act(Q[r][:] + b_r) for rows [r0, r1) of a panel of width W (after a GEMM).
template <int VB, typename scalar_t, typename acc_t>
SPARSEVD_INLINE void bias_act_rows(acc_t* __restrict Q, int64_t W, const scalar_t* __restrict bias,
                                   int64_t act, acc_t param, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    acc_t* __restrict q = Q + r * W;
    if (bias != nullptr) {
      const acc_t b = to_acc<acc_t>(bias[r]);
      for (int64_t i = 0; i < W; ++i) q[i] += b;
    }
    act_inplace<VB>(q, W, act, param);
  }
}

// ---- threads -----------------------------------------------------------------------------

// Row boundaries of at most `parts` contiguous ranges of about equal work,
// work(r) = nnz(r) + 1 (so empty rows still count for their output). Non-decreasing
// whatever crow holds (an invalid crow only unbalances the split; the kernels report it).
inline std::vector<int64_t> balanced_rows(const int32_t* crow, int64_t N, int64_t parts) {
  std::vector<int64_t> bounds(parts + 1, N);
  bounds[0] = 0;
  const int64_t total = static_cast<int64_t>(crow[N]) - crow[0] + N;
  for (int64_t p = 1; p < parts; ++p) {
    // first row r with crow[r] - crow[0] + r >= target, by bisection
    const int64_t target = total * p / parts;
    int64_t lo = 0, hi = N;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<int64_t>(crow[mid]) - crow[0] + mid < target) lo = mid + 1; else hi = mid;
    }
    bounds[p] = std::max(bounds[p - 1], lo);
  }
  return bounds;
}

// Runs task(t) for t in [0, tasks) on a team of min(tasks, threads) threads that claim
// them in order; `init` (called once per thread that claims one, before its first)
// returns the thread's state, passed to each task. Marks the cores contended when the
// calling thread waited for the others longer than it computed.
template <typename Init, typename Task>
void run_tasks(int64_t tasks, const Init& init, const Task& task) {
  std::atomic<int64_t> next{0};
  int64_t caller_done = 0;
  const int64_t start = now_ns(), start_cpu = thread_cpu_ns();
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    int64_t t = next.fetch_add(1, std::memory_order_relaxed);
    if (t < tasks) {
      auto state = init();
      for (; t < tasks; t = next.fetch_add(1, std::memory_order_relaxed)) task(t, state);
    }
    if (at::get_thread_num() == 0) caller_done = now_ns();
  });
  const int64_t end = now_ns(), cpu = start_cpu < 0 ? -1 : thread_cpu_ns() - start_cpu;
  // Waiting for the last task of a thread that started in time takes a fraction of what
  // the caller computed (its share is kTasksPerThread tasks); waiting longer than all of
  // it means a thread of the team did not run.
  const bool waited = caller_done > 0 && end - caller_done > (caller_done - start) + 50'000;
  const bool descheduled = cpu >= 0 && end - start > 2 * cpu + 50'000;
  if (waited || descheduled) contended_until_ns().store(end + kContendedNs, std::memory_order_relaxed);
}

// Runs f(r0, r1) over [0, N) rows of `work` multiply-adds in all, in contiguous ranges
// of at least `grain` rows shared among threads (inline when small, already inside a
// parallel region or on contended cores).
template <typename F>
void for_rows(int64_t N, int64_t work, int64_t grain, const F& f) {
  if (!share_work(work) || N <= grain) {
    f(int64_t(0), N);
    return;
  }
  const int64_t tasks = task_count(work, (N + grain - 1) / grain);
  const int64_t rows = (N + tasks - 1) / tasks;
  run_tasks(tasks, [] { return 0; }, [&](int64_t t, int) { f(t * rows, std::min(N, (t + 1) * rows)); });
}

// Runs f(r0, r1, bad) over [0, N) in row ranges of about equal work (non-zeros + rows)
// shared among threads (inline when small, already inside a parallel region or on
// contended cores); returns the first error.
template <typename F>
BadIndex for_rows_balanced(const int32_t* crow, int64_t N, int64_t work, const F& f) {
  if (!share_work(work) || N <= 1) {
    BadIndex bad;
    f(int64_t(0), N, bad);
    return bad;
  }
  const int64_t parts = task_count(work, N);
  const std::vector<int64_t> bounds = balanced_rows(crow, N, parts);
  std::vector<BadIndex> bad(parts);
  run_tasks(parts, [] { return 0; }, [&](int64_t p, int) {
    if (bounds[p] < bounds[p + 1]) f(bounds[p], bounds[p + 1], bad[p]);
  });
  return first_bad(bad);
}

}  // namespace csr
}  // namespace sparsevd

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
