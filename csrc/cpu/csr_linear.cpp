// CPU kernel of sparsevd::csr_linear: y = x·Wᵀ + b with W [N, K] in CSR (rows = output
// features, int32 indices), x [M, K], fp32 accumulation (fp64 for float64).
//
// Computed as the SpMM yᵀ = W·xᵀ:
//   - M == 1: a sparse GEMV reading x directly; with AVX-512 and float32, 16 non-zeros
//     per step with one gather of x; otherwise 4 independent scalar chains per row.
//   - M > 1: x is transposed once into xᵀ [K, ldm] in the accumulation type (ldm = M
//     rounded up to one SIMD vector, padding zeroed), so every non-zero w_nk reads one
//     contiguous row slice xᵀ[k, m0:m0+W] and does W fused multiply-adds into register
//     accumulators. M is processed in blocks of W = 16, 32 or 64 floats (8..32 doubles):
//     as wide as keeps the slab xᵀ[:, m0:m0+W] within ~512 KiB of L2 while a thread
//     walks its rows; narrow blocks use several accumulator chains to hide FMA latency.
//     Results are staged for 16 rows at a time and written to y [M, N] in runs of 16
//     contiguous outputs (one row of W is a column of y).
//   - Long rows are summed in chunks of 64 non-zeros (two-level summation), which keeps
//     the rounding error near that of a blocked dense GEMM.
// Rows are split among threads by equal work (non-zeros + rows), not equal row counts:
// SparseVD layers have many empty rows (pruned neurons) next to dense ones. Small
// problems run inline on the calling thread (no thread-pool wake-up, no allocation for
// M == 1): a batch-1 call on a 300×784 layer at 95% sparsity costs a few microseconds.
// Multi-threading needs -fopenmp at build time (at::parallel_for is header-only).
//
// The inner loops are compiled three times (AVX-512, AVX2+FMA, baseline) and chosen at
// run time on x86-64 with GCC/Clang, as PyTorch does for its own kernels; elsewhere
// the baseline build is used.
//
// O(1) argument checks run on every call; the O(nnz) checks (sorted, in-range column
// indices, monotone crow_indices) are the caller's business, done once when the CSR
// weight is built (sparsevd pruning/export).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64)) && !defined(__INTEL_COMPILER)
#define SPARSEVD_X86_MULTIVERSION 1
#else
#define SPARSEVD_X86_MULTIVERSION 0
#endif

#if SPARSEVD_X86_MULTIVERSION
#include <immintrin.h>
#endif

#if !defined(_OPENMP)
#pragma message("sparsevd csr_linear.cpp: compiled without -fopenmp, so at::parallel_for runs on one thread; build with -fopenmp (cxx and link flags), as PyTorch's own CPU kernels are")
#endif

#if defined(__GNUC__)
#define SPARSEVD_INLINE inline __attribute__((always_inline))
#else
#define SPARSEVD_INLINE inline
#endif

namespace sparsevd {

// Shared by the CPU and CUDA kernels of csr_linear (the CUDA file declares it): the
// O(1) checks on shapes, dtypes and devices. Returns N, the number of output features.
int64_t csr_linear_check_args(const at::Tensor& x, const at::Tensor& crow_indices,
                              const at::Tensor& col_indices, const at::Tensor& values,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& row_order) {
  constexpr const char* op = "sparsevd::csr_linear";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(crow_indices.dim() == 1, op, ": crow_indices must be 1-D [N + 1], got shape ",
              crow_indices.sizes());
  TORCH_CHECK(col_indices.dim() == 1, op, ": col_indices must be 1-D [nnz], got shape ",
              col_indices.sizes());
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D [nnz], got shape ", values.sizes());
  TORCH_CHECK(crow_indices.scalar_type() == at::kInt, op,
              ": crow_indices must be int32, got ", crow_indices.scalar_type(),
              " (convert once with .to(torch.int32))");
  TORCH_CHECK(col_indices.scalar_type() == at::kInt, op,
              ": col_indices must be int32, got ", col_indices.scalar_type(),
              " (convert once with .to(torch.int32))");
  TORCH_CHECK(crow_indices.numel() >= 1, op,
              ": crow_indices must have N + 1 >= 1 entries, got an empty tensor");
  TORCH_CHECK(col_indices.numel() == values.numel(), op,
              ": col_indices and values must have the same length (nnz), got ",
              col_indices.numel(), " and ", values.numel());
  TORCH_CHECK(col_indices.numel() <= INT32_MAX, op, ": nnz must fit in int32, got ",
              col_indices.numel());
  const auto dtype = values.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              op, ": values must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(x.scalar_type() == dtype, op, ": x and values must have the same dtype, got ",
              x.scalar_type(), " and ", dtype);
  const auto device = x.device();
  TORCH_CHECK(crow_indices.device() == device && col_indices.device() == device &&
                  values.device() == device,
              op, ": all tensors must be on the same device, got x on ", device,
              ", crow_indices on ", crow_indices.device(), ", col_indices on ",
              col_indices.device(), ", values on ", values.device());
  TORCH_CHECK(x.size(1) > 0 || values.numel() == 0, op, ": x has K = 0 features but W has ",
              values.numel(), " non-zeros");
  const int64_t n = crow_indices.numel() - 1;
  if (bias.has_value() && bias->defined()) {
    const auto& b = *bias;
    TORCH_CHECK(b.device() == device, op, ": bias must be on the same device as x, got bias on ",
                b.device(), " and x on ", device);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n, op,
                ": bias must be 1-D with one entry per output feature (N = ",
                "crow_indices.numel() - 1 = ", n, "), got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == dtype, op, ": bias must have the dtype of x (", dtype,
                "), got ", b.scalar_type());
  }
  if (row_order.has_value() && row_order->defined()) {
    // That it is a permutation is checked once by its owner (functional.csr_linear,
    // SparseLinear), like the CSR structure: an O(N) pass per call would cost a launch.
    const auto& r = *row_order;
    TORCH_CHECK(r.dim() == 1 && r.numel() == n && r.scalar_type() == at::kInt, op,
                ": row_order must be a 1-D int32 permutation of the N = ", n, " rows, got ",
                r.scalar_type(), " of shape ", r.sizes());
    TORCH_CHECK(r.device() == device, op, ": row_order must be on the same device as x, got ",
                r.device(), " and x on ", device);
  }
  return n;
}

namespace {

// ---------------------------------------------------------------------------------------
// Inner loops. Everything below is header-style, always inlined into the per-ISA entry
// points at the bottom, so one source is compiled once per instruction set.

template <typename acc_t, typename scalar_t>
SPARSEVD_INLINE acc_t to_acc(scalar_t v) { return static_cast<acc_t>(v); }

// SIMD vectors of VB bytes in GCC/Clang vector-extension form, one register of the
// instruction set at hand: 64 (zmm, AVX-512), 32 (ymm, AVX2) or 16 (xmm, baseline).
// Loads and stores go through memcpy (unaligned vmovups).
template <typename acc_t, int VB>
struct Simd {
  typedef acc_t V __attribute__((vector_size(VB)));
  static constexpr int kLanes = VB / static_cast<int>(sizeof(acc_t));
};

// xᵀ rows are padded to a multiple of 64 bytes: whole vectors for every width.
constexpr int64_t kPadBytes = 64;
// Target size of the xᵀ slab that one batch block reads (see spmm_rows).
constexpr int64_t kSlabBytes = int64_t(512) << 10;

// Non-zeros per partial sum (two-level summation of long rows).
constexpr int64_t kSumChunk = 64;

// y[0, r] = Σ_j w_rj x[0, col_j] + b_r for rows r in [r0, r1) — the M == 1 GEMV.
template <typename scalar_t, typename acc_t>
SPARSEVD_INLINE void gemv_rows(const int32_t* __restrict crow, const int32_t* __restrict col,
                               const scalar_t* __restrict val, const scalar_t* __restrict x,
                               int64_t sx, const scalar_t* __restrict bias,
                               scalar_t* __restrict y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j = crow[r];
    const int64_t end = crow[r + 1];
    acc_t sum = 0;
    while (j < end) {
      // Four chains for instruction-level parallelism, restarted every 4·kSumChunk
      // non-zeros (two-level summation, see spmm_block).
      const int64_t stop = std::min<int64_t>(end, j + 4 * kSumChunk);
      acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (; j + 4 <= stop; j += 4) {
        a0 += to_acc<acc_t>(val[j]) * to_acc<acc_t>(x[col[j] * sx]);
        a1 += to_acc<acc_t>(val[j + 1]) * to_acc<acc_t>(x[col[j + 1] * sx]);
        a2 += to_acc<acc_t>(val[j + 2]) * to_acc<acc_t>(x[col[j + 2] * sx]);
        a3 += to_acc<acc_t>(val[j + 3]) * to_acc<acc_t>(x[col[j + 3] * sx]);
      }
      for (; j < stop; ++j) a0 += to_acc<acc_t>(val[j]) * to_acc<acc_t>(x[col[j] * sx]);
      sum += (a0 + a1) + (a2 + a3);
    }
    if (bias != nullptr) sum += to_acc<acc_t>(bias[r]);
    y[r] = static_cast<scalar_t>(sum);
  }
}

// One block of NV vectors (NV · kLanes batch columns starting at m0) for rows [r0, r1):
// acc = Σ_j w_rj xᵀ[col_j, m0 : m0 + NV·kLanes], then y[m, r] = acc[m - m0] + b_r for
// the columns m < M.
//   - Narrow blocks (NV < 4) run 4/NV independent chains over the non-zeros, so that
//     the FMA latency is hidden as well as with 4 accumulators.
//   - Results of kRowTile rows are staged in a small transposed tile and written as
//     runs of kRowTile contiguous outputs per batch row: writing y[m, r] one row of W
//     at a time would touch one cache line (and one page, for large N) per output.
constexpr int64_t kRowTile = 16;

template <int VB, int NV, typename scalar_t, typename acc_t>
SPARSEVD_INLINE void spmm_block(const int32_t* __restrict crow, const int32_t* __restrict col,
                                const scalar_t* __restrict val, const acc_t* __restrict xt,
                                int64_t ldm, int64_t m0, int64_t M, int64_t N,
                                const scalar_t* __restrict bias, scalar_t* __restrict y,
                                int64_t r0, int64_t r1) {
  using V = typename Simd<acc_t, VB>::V;
  constexpr int L = Simd<acc_t, VB>::kLanes;
  constexpr int C = NV >= 4 ? 1 : 4 / NV;  // independent accumulator chains
  const acc_t* __restrict xb = xt + m0;
  const int64_t valid = std::min<int64_t>(NV * L, M - m0);
  alignas(64) acc_t tile[NV * L][kRowTile];
  for (int64_t rb = r0; rb < r1; rb += kRowTile) {
    const int64_t re = std::min<int64_t>(rb + kRowTile, r1);
    for (int64_t r = rb; r < re; ++r) {
      V acc[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = V{};
      const int64_t end = crow[r + 1];
      for (int64_t j = crow[r]; j < end;) {
        // Two-level summation: a fresh partial sum per chunk of kSumChunk non-zeros
        // keeps the rounding error of long rows near that of a blocked dense GEMM.
        const int64_t stop = std::min<int64_t>(end, j + kSumChunk);
        V part[C][NV];
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) part[c][v] = V{};
        for (; j + C <= stop; j += C) {
#pragma GCC unroll 8
          for (int c = 0; c < C; ++c) {
            const acc_t w = to_acc<acc_t>(val[j + c]);
            const acc_t* __restrict xr = xb + static_cast<int64_t>(col[j + c]) * ldm;
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) {
              V xv;
              std::memcpy(&xv, xr + v * L, sizeof(V));
              part[c][v] += w * xv;
            }
          }
        }
        for (; j < stop; ++j) {
          const acc_t w = to_acc<acc_t>(val[j]);
          const acc_t* __restrict xr = xb + static_cast<int64_t>(col[j]) * ldm;
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) {
            V xv;
            std::memcpy(&xv, xr + v * L, sizeof(V));
            part[0][v] += w * xv;
          }
        }
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[v] += part[c][v];
      }
      const acc_t b = bias != nullptr ? to_acc<acc_t>(bias[r]) : acc_t(0);
      alignas(64) acc_t out[NV * L];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) std::memcpy(out + v * L, &acc[v], sizeof(V));
      for (int i = 0; i < NV * L; ++i) tile[i][r - rb] = out[i] + b;
    }
    for (int64_t i = 0; i < valid; ++i) {
      scalar_t* __restrict yr = y + (m0 + i) * N + rb;
      for (int64_t rr = 0; rr < re - rb; ++rr) yr[rr] = static_cast<scalar_t>(tile[i][rr]);
    }
  }
}

// Rows [r0, r1) for all batch columns: full blocks of 4, 2 or 1 vectors of VB bytes —
// the widest whose slab xᵀ[:, block] (K rows) fits in kSlabBytes, so that it stays in
// L2 while the thread sweeps its rows — then one narrower block for the remaining
// vectors (the last one padded with zeros in xᵀ).
template <int VB, typename scalar_t, typename acc_t>
SPARSEVD_INLINE void spmm_rows(const int32_t* crow, const int32_t* col, const scalar_t* val,
                               const acc_t* xt, int64_t ldm, int64_t K, int64_t M, int64_t N,
                               const scalar_t* bias, scalar_t* y, int64_t r0, int64_t r1) {
  constexpr int L = Simd<acc_t, VB>::kLanes;
  const int64_t block_vecs = K * VB * 4 <= kSlabBytes ? 4 : K * VB * 2 <= kSlabBytes ? 2 : 1;
  const int64_t vecs = ldm / L;
  int64_t v0 = 0;
  for (; v0 + block_vecs <= vecs; v0 += block_vecs) {
    const int64_t m0 = v0 * L;
    if (block_vecs == 4) spmm_block<VB, 4>(crow, col, val, xt, ldm, m0, M, N, bias, y, r0, r1);
    else if (block_vecs == 2) spmm_block<VB, 2>(crow, col, val, xt, ldm, m0, M, N, bias, y, r0, r1);
    else spmm_block<VB, 1>(crow, col, val, xt, ldm, m0, M, N, bias, y, r0, r1);
  }
  const int64_t m0 = v0 * L;
  switch (vecs - v0) {
    case 3: spmm_block<VB, 3>(crow, col, val, xt, ldm, m0, M, N, bias, y, r0, r1); break;
    case 2: spmm_block<VB, 2>(crow, col, val, xt, ldm, m0, M, N, bias, y, r0, r1); break;
    case 1: spmm_block<VB, 1>(crow, col, val, xt, ldm, m0, M, N, bias, y, r0, r1); break;
    default: break;
  }
}

// xᵀ[k, m] = x[m, k] in the accumulation type for k in [k0, k1), columns m in [M, ldm)
// zeroed. Tiles of 16 × 16 keep both the reads and the writes in cache lines.
template <typename scalar_t, typename acc_t>
SPARSEVD_INLINE void transpose_cols(const scalar_t* __restrict x, int64_t sm, int64_t sk,
                                    acc_t* __restrict xt, int64_t ldm, int64_t M, int64_t k0,
                                    int64_t k1) {
  constexpr int64_t T = 16;
  for (int64_t kb = k0; kb < k1; kb += T) {
    const int64_t ke = std::min(kb + T, k1);
    for (int64_t mb = 0; mb < M; mb += T) {
      const int64_t me = std::min(mb + T, M);
      for (int64_t k = kb; k < ke; ++k) {
        acc_t* __restrict dst = xt + k * ldm;
        const scalar_t* __restrict src = x + k * sk;
        for (int64_t m = mb; m < me; ++m) dst[m] = to_acc<acc_t>(src[m * sm]);
      }
    }
    for (int64_t k = kb; k < ke; ++k)
      for (int64_t m = M; m < ldm; ++m) xt[k * ldm + m] = acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------
// Per-ISA entry points: same body, different code generation.

template <typename scalar_t, typename acc_t>
struct Kernels {
  using Gemv = void (*)(const int32_t*, const int32_t*, const scalar_t*, const scalar_t*,
                        int64_t, const scalar_t*, scalar_t*, int64_t, int64_t);
  using Spmm = void (*)(const int32_t*, const int32_t*, const scalar_t*, const acc_t*, int64_t,
                        int64_t, int64_t, int64_t, const scalar_t*, scalar_t*, int64_t, int64_t);
  using Transpose = void (*)(const scalar_t*, int64_t, int64_t, acc_t*, int64_t, int64_t,
                             int64_t, int64_t);
  Gemv gemv;
  Spmm spmm;
  Transpose transpose;
};

#define SPARSEVD_DEFINE_ISA(SUFFIX, VB, ATTR)                                                  \
  template <typename scalar_t, typename acc_t>                                                \
  ATTR void gemv_##SUFFIX(const int32_t* crow, const int32_t* col, const scalar_t* val,       \
                          const scalar_t* x, int64_t sx, const scalar_t* bias, scalar_t* y,   \
                          int64_t r0, int64_t r1) {                                           \
    gemv_rows<scalar_t, acc_t>(crow, col, val, x, sx, bias, y, r0, r1);                       \
  }                                                                                           \
  template <typename scalar_t, typename acc_t>                                                \
  ATTR void spmm_##SUFFIX(const int32_t* crow, const int32_t* col, const scalar_t* val,       \
                          const acc_t* xt, int64_t ldm, int64_t K, int64_t M, int64_t N,      \
                          const scalar_t* bias, scalar_t* y, int64_t r0, int64_t r1) {        \
    spmm_rows<VB, scalar_t, acc_t>(crow, col, val, xt, ldm, K, M, N, bias, y, r0, r1);        \
  }                                                                                           \
  template <typename scalar_t, typename acc_t>                                                \
  ATTR void transpose_##SUFFIX(const scalar_t* x, int64_t sm, int64_t sk, acc_t* xt,          \
                               int64_t ldm, int64_t M, int64_t k0, int64_t k1) {              \
    transpose_cols<scalar_t, acc_t>(x, sm, sk, xt, ldm, M, k0, k1);                           \
  }

SPARSEVD_DEFINE_ISA(base, 16, )
#if SPARSEVD_X86_MULTIVERSION
SPARSEVD_DEFINE_ISA(avx2, 32, __attribute__((target("avx2,fma,f16c"))))
SPARSEVD_DEFINE_ISA(avx512, 64, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))))
#endif
#undef SPARSEVD_DEFINE_ISA

#if SPARSEVD_X86_MULTIVERSION
// float32 GEMV with AVX-512 gathers: 16 non-zeros per step (one load of 16 column
// indices, one of 16 values, one gather of x), 16 partial sums per row reduced at the
// end. About twice the scalar loop's speed at SparseVD densities.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) void gemv_f32_avx512_gather(
    const int32_t* crow, const int32_t* col, const float* val, const float* x, int64_t sx,
    const float* bias, float* y, int64_t r0, int64_t r1) {
  if (sx != 1) {
    gemv_avx512<float, float>(crow, col, val, x, sx, bias, y, r0, r1);
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    int64_t j = crow[r];
    const int64_t end = crow[r + 1];
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; j + 32 <= end; j += 32) {
      const __m512i c0 = _mm512_loadu_si512(col + j);
      const __m512i c1 = _mm512_loadu_si512(col + j + 16);
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(val + j), _mm512_i32gather_ps(c0, x, 4), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(val + j + 16), _mm512_i32gather_ps(c1, x, 4), acc1);
    }
    for (; j < end; j += 16) {
      const int64_t left = end - j;
      const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
      const __m512i c = _mm512_maskz_loadu_epi32(m, col + j);
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, c, x, 4);
      acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, val + j), xv, acc0);
    }
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    if (bias != nullptr) sum += bias[r];
    y[r] = sum;
  }
}
#endif

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
#if SPARSEVD_X86_MULTIVERSION
  // SPARSEVD_CPU_ISA=avx2|base caps the instruction set (to test the other builds).
  const char* cap = std::getenv("SPARSEVD_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "base") == 0) return Isa::kBase;
  const bool avx2_cap = cap != nullptr && std::strcmp(cap, "avx2") == 0;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && !avx2_cap)
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

template <typename scalar_t, typename acc_t>
const Kernels<scalar_t, acc_t>& kernels() {
  static const Kernels<scalar_t, acc_t> chosen = [] {
    switch (detect_isa()) {
#if SPARSEVD_X86_MULTIVERSION
      case Isa::kAvx512:
        if constexpr (std::is_same_v<scalar_t, float>) {
          return Kernels<scalar_t, acc_t>{&gemv_f32_avx512_gather, &spmm_avx512<scalar_t, acc_t>,
                                          &transpose_avx512<scalar_t, acc_t>};
        }
        return Kernels<scalar_t, acc_t>{&gemv_avx512<scalar_t, acc_t>,
                                        &spmm_avx512<scalar_t, acc_t>,
                                        &transpose_avx512<scalar_t, acc_t>};
      case Isa::kAvx2:
        return Kernels<scalar_t, acc_t>{&gemv_avx2<scalar_t, acc_t>, &spmm_avx2<scalar_t, acc_t>,
                                        &transpose_avx2<scalar_t, acc_t>};
#endif
      default:
        return Kernels<scalar_t, acc_t>{&gemv_base<scalar_t, acc_t>, &spmm_base<scalar_t, acc_t>,
                                        &transpose_base<scalar_t, acc_t>};
    }
  }();
  return chosen;
}

// Below this many multiply-adds a call runs on the calling thread: waking the pool
// costs more than it saves.
constexpr int64_t kSerialWork = 1 << 15;

// Runs f(r0, r1) over [0, N) in at most `parts` contiguous row ranges of about equal
// work, work(r) = nnz(r) + 1 (so empty rows still count for their output write).
template <typename F>
void for_rows_balanced(const int32_t* crow, int64_t N, int64_t work, const F& f) {
  const int64_t threads = at::get_num_threads();
  if (work < kSerialWork || threads <= 1 || N <= 1 || at::in_parallel_region()) {
    f(int64_t(0), N);
    return;
  }
  const int64_t parts = std::min<int64_t>(threads, N);
  const int64_t total = static_cast<int64_t>(crow[N] - crow[0]) + N;
  // First row r with crow[r] - crow[0] + r >= target: a binary search on a monotone key.
  auto boundary = [&](int64_t part) -> int64_t {
    if (part >= parts) return N;
    const int64_t target = total * part / parts;
    int64_t lo = 0, hi = N;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<int64_t>(crow[mid] - crow[0]) + mid < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = boundary(p), r1 = boundary(p + 1);
      if (r0 < r1) f(r0, r1);
    }
  });
}

template <typename scalar_t>
void csr_linear_cpu_impl(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& values, const at::Tensor* bias, at::Tensor& y) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto& k = kernels<scalar_t, acc_t>();
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const int64_t nnz = values.numel();
  const int32_t* crow_p = crow.const_data_ptr<int32_t>();
  const int32_t* col_p = col.const_data_ptr<int32_t>();
  const scalar_t* val_p = values.const_data_ptr<scalar_t>();
  const scalar_t* bias_p = bias != nullptr ? bias->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y_p = y.mutable_data_ptr<scalar_t>();
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();

  if (M == 1) {
    // x is read with unit stride here (csr_linear_cpu copies a strided batch row).
    const int64_t sx = x.stride(1);
    for_rows_balanced(crow_p, N, nnz + N, [&](int64_t r0, int64_t r1) {
      k.gemv(crow_p, col_p, val_p, x_p, sx, bias_p, y_p, r0, r1);
    });
    return;
  }

  // xᵀ [K, ldm] in the accumulation type, batch padded to whole SIMD vectors.
  constexpr int64_t L = kPadBytes / static_cast<int64_t>(sizeof(acc_t));
  const int64_t ldm = (M + L - 1) / L * L;
  at::Tensor xt = at::empty({K * ldm}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* xt_p = xt.mutable_data_ptr<acc_t>();
  const int64_t sm = x.stride(0), sk = x.stride(1);
  const int64_t transpose_work = K * ldm;
  if (transpose_work < kSerialWork || at::in_parallel_region()) {
    k.transpose(x_p, sm, sk, xt_p, ldm, M, 0, K);
  } else {
    at::parallel_for(0, K, std::max<int64_t>(16, kSerialWork / ldm), [&](int64_t k0, int64_t k1) {
      k.transpose(x_p, sm, sk, xt_p, ldm, M, k0, k1);
    });
  }
  for_rows_balanced(crow_p, N, (nnz + N) * ldm, [&](int64_t r0, int64_t r1) {
    k.spmm(crow_p, col_p, val_p, xt_p, ldm, K, M, N, bias_p, y_p, r0, r1);
  });
}

at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& crow_indices,
                          const at::Tensor& col_indices, const at::Tensor& values,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& row_order) {
  // row_order only schedules GPU thread blocks; this kernel balances its threads by
  // splitting rows and non-zeros evenly (see the partition above).
  const int64_t N = csr_linear_check_args(x, crow_indices, col_indices, values, bias, row_order);
  TORCH_CHECK(x.device().is_cpu(), "sparsevd::csr_linear: the CPU kernel got x on ",
              x.device());
  const int64_t M = x.size(0);
  const int64_t nnz = values.numel();
  const at::Tensor crow = crow_indices.contiguous();
  // O(1) structural checks that protect the kernel's memory accesses.
  const int32_t first = crow.const_data_ptr<int32_t>()[0];
  const int32_t last = crow.const_data_ptr<int32_t>()[N];
  TORCH_CHECK(first == 0 && last == nnz, "sparsevd::csr_linear: crow_indices must start at 0 ",
              "and end at nnz = ", nnz, ", got ", first, " and ", last);

  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  if (nnz == 0) {
    if (has_bias) y.copy_(b.unsqueeze(0).expand({M, N})); else y.zero_();
    return y;
  }
  const at::Tensor col = col_indices.contiguous();
  const at::Tensor val = values.contiguous();
  // M > 1 transposes x once anyway, reading it through its strides: no copy.
  // A single batch row with a stride along K is copied (K elements) so that the GEMV
  // gives the same bits as for a contiguous x.
  const at::Tensor xx = (M == 1 && x.stride(1) != 1) ? x.contiguous() : x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csr_linear_cpu", [&] {
    csr_linear_cpu_impl<scalar_t>(xx, crow, col, val, has_bias ? &b : nullptr, y);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) { m.impl("csr_linear", &csr_linear_cpu); }

}  // namespace sparsevd
