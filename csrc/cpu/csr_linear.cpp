// CPU kernel of sparsevd::csr_linear: y = x·Wᵀ + b with W [N, K] in CSR (rows = output
// features, int32 indices), x [M, K], fp32 accumulation (fp64 for float64).
//
// Computed as the SpMM yᵀ = W·xᵀ (inner loops in csr_kernels.h):
//   - M == 1: a sparse GEMV reading x directly; with AVX-512 and float32, 16 non-zeros
//     per step with one gather of x; otherwise 4 independent scalar chains per row.
//   - M > 1: the batch is cut into blocks of W = 4 SIMD vectors (64 floats with
//     AVX-512; fewer when K is so large that the panel would not stay in L2), and the
//     last block is only as wide as the vectors it needs. A block is packed into a
//     contiguous panel P [K][W] and every row of W sweeps it, one contiguous W-wide
//     read per non-zero; results are staged for 16 rows and written to y [M, N] in
//     runs of 16 contiguous outputs (a row of W is a column of y).
//   - Long rows are summed in chunks of 64 non-zeros (two-level summation), which keeps
//     the rounding error near that of a blocked dense GEMM.
// Threads: with enough batch blocks each thread packs and computes its own blocks (no
// shared data, no duplicated packing); otherwise all panels are packed once and rows are
// split among threads by equal work (non-zeros + rows), not equal row counts: SparseVD
// layers have many empty rows (pruned neurons) next to dense ones. Small problems run
// inline on the calling thread (no thread-pool wake-up, no allocation for M == 1).
// Multi-threading needs -fopenmp at build time (at::parallel_for is header-only).
//
// The inner loops are compiled per instruction set (AVX-512, AVX2+FMA, portable) and
// chosen once by vec_math.h's cpu_isa(), which honours ATEN_CPU_CAPABILITY.
//
// Nothing trusts the structure: crow[0] = 0 and crow[N] = nnz are checked per call,
// every row's 0 <= crow[r] <= crow[r+1] <= nnz where the row starts and every column
// index where it is read; the first bad index stops the kernel and raises after the
// parallel loop (RuntimeError for crow_indices, IndexError for col_indices).
// The order of a row's columns is not checked (a valid structure has them sorted and
// unique: reference.csr_structure_error): unsorted or repeated columns are summed as
// they come, as on CUDA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "../csr_linear_checks.h"
#include "csr_kernels.h"

#if !defined(_OPENMP)
#pragma message("sparsevd csr_linear.cpp: compiled without -fopenmp, so at::parallel_for runs on one thread; build with -fopenmp (cxx and link flags), as PyTorch's own CPU kernels are")
#endif

namespace sparsevd {

namespace {

using csr::BadIndex;
using csr::acc_type;

// y[r] = sum + b_r, for the GEMV.
template <typename scalar_t, typename acc_t>
struct StoreY {
  const scalar_t* bias;
  scalar_t* y;
  SPARSEVD_INLINE void operator()(int64_t r, acc_t sum) const {
    y[r] = static_cast<scalar_t>(bias != nullptr ? sum + csr::to_acc<acc_t>(bias[r]) : sum);
  }
};

// Panels of 4 vectors per row at most (see csr_kernels.h); the tail block of a batch
// needs 1 to 4, or half a vector.
constexpr int kMaxVectors = 4;

// Rows [r0, r1) against a panel of `width` values per row: 1..4 SIMD vectors of VB
// bytes, or one of VB / 2 (in the AVX2 / AVX-512 builds).
template <int VB, typename scalar_t, typename acc_t>
SPARSEVD_INLINE bool spmm_panel(int64_t width, const int32_t* crow, const int32_t* col,
                                const scalar_t* val, uint32_t nnz, const acc_t* P, uint32_t K,
                                const scalar_t* bias, int64_t m0, int64_t valid, int64_t N,
                                scalar_t* y, int64_t r0, int64_t r1, BadIndex& bad) {
  constexpr int64_t L = csr::Simd<acc_t, VB>::kLanes;
  if constexpr (VB >= 32) {
    if (width < L)
      return csr::spmm_rows_to_y<VB / 2, 1>(crow, col, val, nnz, P, K, bias, m0, valid, N, y, r0, r1, bad);
  }
  switch (width / L) {
    case 1: return csr::spmm_rows_to_y<VB, 1>(crow, col, val, nnz, P, K, bias, m0, valid, N, y, r0, r1, bad);
    case 2: return csr::spmm_rows_to_y<VB, 2>(crow, col, val, nnz, P, K, bias, m0, valid, N, y, r0, r1, bad);
    case 3: return csr::spmm_rows_to_y<VB, 3>(crow, col, val, nnz, P, K, bias, m0, valid, N, y, r0, r1, bad);
    default: return csr::spmm_rows_to_y<VB, 4>(crow, col, val, nnz, P, K, bias, m0, valid, N, y, r0, r1, bad);
  }
}

// ---------------------------------------------------------------------------------------
// Per-ISA entry points: same body, different code generation.

#define SPARSEVD_DEFINE_ISA(SUFFIX, VB, ATTR)                                                  \
  template <typename scalar_t>                                                                \
  ATTR bool gemv_##SUFFIX(const int32_t* crow, const int32_t* col, const scalar_t* val,       \
                          uint32_t nnz, const scalar_t* x, uint32_t K, const scalar_t* bias,  \
                          scalar_t* y, int64_t r0, int64_t r1, BadIndex& bad) {               \
    using acc_t = acc_type<scalar_t>;                                                         \
    return csr::gemv_rows<scalar_t, scalar_t, acc_t>(crow, col, val, nnz, x, K, r0, r1,       \
                                                     StoreY<scalar_t, acc_t>{bias, y}, bad);  \
  }                                                                                           \
  template <typename scalar_t>                                                                \
  ATTR bool spmm_##SUFFIX(int64_t width, const int32_t* crow, const int32_t* col,             \
                          const scalar_t* val, uint32_t nnz, const acc_type<scalar_t>* P,     \
                          uint32_t K, const scalar_t* bias, int64_t m0, int64_t valid,        \
                          int64_t N, scalar_t* y, int64_t r0, int64_t r1, BadIndex& bad) {    \
    return spmm_panel<VB>(width, crow, col, val, nnz, P, K, bias, m0, valid, N, y, r0, r1,    \
                          bad);                                                               \
  }                                                                                           \
  template <typename scalar_t>                                                                \
  ATTR void pack_##SUFFIX(const scalar_t* x, int64_t sm, int64_t sk, int64_t m0,              \
                          int64_t valid, int64_t K, int64_t W, acc_type<scalar_t>* P) {       \
    csr::pack_panel<VB>(x, sm, sk, m0, valid, K, W, P);                                       \
  }

SPARSEVD_DEFINE_ISA(portable, 16, )
#if SPARSEVD_X86
SPARSEVD_DEFINE_ISA(avx2, 32, SPARSEVD_TARGET_AVX2)
SPARSEVD_DEFINE_ISA(avx512, 64, SPARSEVD_TARGET_AVX512)
#endif
#undef SPARSEVD_DEFINE_ISA

template <typename scalar_t>
struct Kernels {
  using acc_t = acc_type<scalar_t>;
  bool (*gemv)(const int32_t*, const int32_t*, const scalar_t*, uint32_t, const scalar_t*,
               uint32_t, const scalar_t*, scalar_t*, int64_t, int64_t, BadIndex&);
  bool (*spmm)(int64_t, const int32_t*, const int32_t*, const scalar_t*, uint32_t, const acc_t*,
               uint32_t, const scalar_t*, int64_t, int64_t, int64_t, scalar_t*, int64_t, int64_t,
               BadIndex&);
  void (*pack)(const scalar_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, acc_t*);
  int64_t lanes;  // acc_t values per SIMD vector
  bool half;      // half-vector panels exist
};

template <typename scalar_t>
const Kernels<scalar_t>& kernels() {
  using acc_t = acc_type<scalar_t>;
  static const Kernels<scalar_t> chosen = []() -> Kernels<scalar_t> {
    constexpr int64_t S = sizeof(acc_t);
    switch (vm::cpu_isa()) {
#if SPARSEVD_X86
      case vm::Isa::kAvx512:
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (csr::use_gathers())
            return {&csr::gemv_f32_avx512_gather, &spmm_avx512<scalar_t>, &pack_avx512<scalar_t>, 64 / S, true};
        }
        return {&gemv_avx512<scalar_t>, &spmm_avx512<scalar_t>, &pack_avx512<scalar_t>, 64 / S, true};
      case vm::Isa::kAvx2:
        return {&gemv_avx2<scalar_t>, &spmm_avx2<scalar_t>, &pack_avx2<scalar_t>, 32 / S, true};
#endif
      default:
        return {&gemv_portable<scalar_t>, &spmm_portable<scalar_t>, &pack_portable<scalar_t>, 16 / S, false};
    }
  }();
  return chosen;
}

template <typename scalar_t>
BadIndex csr_linear_cpu_impl(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                             const at::Tensor& values, const at::Tensor* bias, at::Tensor& y) {
  using acc_t = acc_type<scalar_t>;
  const auto& k = kernels<scalar_t>();
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  const int64_t nnz = values.numel();
  const uint32_t unnz = static_cast<uint32_t>(nnz), ucols = csr::col_limit(K);
  const int32_t* crow_p = crow.const_data_ptr<int32_t>();
  const int32_t* col_p = col.const_data_ptr<int32_t>();
  const scalar_t* val_p = values.const_data_ptr<scalar_t>();
  const scalar_t* bias_p = bias != nullptr ? bias->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y_p = y.mutable_data_ptr<scalar_t>();
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();

  if (M == 1) {
    // x is read with unit stride here (csr_linear_cpu copies a strided batch row).
    return csr::for_rows_balanced(crow_p, N, nnz + N, [&](int64_t r0, int64_t r1, BadIndex& bad) {
      k.gemv(crow_p, col_p, val_p, unnz, x_p, ucols, bias_p, y_p, r0, r1, bad);
    });
  }

  int64_t vectors = kMaxVectors;
  while (vectors > 1 && K * vectors * k.lanes * int64_t(sizeof(acc_t)) > csr::kPanelBytes) vectors /= 2;
  const csr::Blocks blocks(M, k.lanes, vectors, k.half);
  const int64_t panel = K * blocks.panel_width(0);  // block 0 is the widest
  const int64_t sm = x.stride(0), sk = x.stride(1);
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t work = (nnz + N) * M;

  auto run_block = [&](int64_t b, const acc_t* P, int64_t r0, int64_t r1, BadIndex& bad) {
    return k.spmm(blocks.panel_width(b), crow_p, col_p, val_p, unnz, P, ucols, bias_p, blocks.m0(b),
                  blocks.valid(b), N, y_p, r0, r1, bad);
  };

  if (blocks.split_blocks(work)) {
    // Each thread packs and sweeps its own batch blocks.
    std::vector<BadIndex> bad(blocks.count);
    csr::run_tasks(
        blocks.count, [&] { return at::empty({panel}, acc_options); },
        [&](int64_t b, at::Tensor& scratch) {
          acc_t* P = scratch.mutable_data_ptr<acc_t>();
          k.pack(x_p, sm, sk, blocks.m0(b), blocks.valid(b), K, blocks.panel_width(b), P);
          run_block(b, P, 0, N, bad[b]);
        });
    return csr::first_bad(bad);
  }
  if (csr::share_work(work)) {
    // Too few blocks to share out: pack them all, then split the rows.
    at::Tensor scratch = at::empty({blocks.count * panel}, acc_options);
    acc_t* P = scratch.mutable_data_ptr<acc_t>();
    csr::for_rows(blocks.count, K * blocks.count * blocks.width, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        k.pack(x_p, sm, sk, blocks.m0(b), blocks.valid(b), K, blocks.panel_width(b), P + b * panel);
    });
    return csr::for_rows_balanced(crow_p, N, work, [&](int64_t r0, int64_t r1, BadIndex& bad) {
      for (int64_t b = 0; b < blocks.count; ++b)
        if (!run_block(b, P + b * panel, r0, r1, bad)) return;
    });
  }
  at::Tensor scratch = at::empty({panel}, acc_options);
  acc_t* P = scratch.mutable_data_ptr<acc_t>();
  BadIndex bad;
  for (int64_t b = 0; b < blocks.count; ++b) {
    k.pack(x_p, sm, sk, blocks.m0(b), blocks.valid(b), K, blocks.panel_width(b), P);
    if (!run_block(b, P, 0, N, bad)) break;
  }
  return bad;
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
  const int32_t first = crow.const_data_ptr<int32_t>()[0];
  const int32_t last = crow.const_data_ptr<int32_t>()[N];
  TORCH_CHECK(first == 0 && last == nnz, "sparsevd::csr_linear: crow_indices must start at 0 ",
              "and end at nnz = ", nnz, ", got ", first, " and ", last);

  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor col = col_indices.contiguous();
  const at::Tensor val = values.contiguous();
  // M > 1 packs x anyway, reading it through its strides: no copy. A single batch row
  // with a stride along K is copied (K elements) so that the GEMV gives the same bits
  // as for a contiguous x.
  const at::Tensor xx = (M == 1 && x.stride(1) != 1) ? x.contiguous() : x;
  BadIndex bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csr_linear_cpu", [&] {
    bad = csr_linear_cpu_impl<scalar_t>(xx, crow, col, val, has_bias ? &b : nullptr, y);
  });
  if (!bad.ok()) csr::raise_bad_index("sparsevd::csr_linear", bad, x.size(1), nnz);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) { m.impl("csr_linear", &csr_linear_cpu); }

}  // namespace sparsevd
