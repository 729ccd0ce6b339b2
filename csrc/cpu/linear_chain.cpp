// CPU kernel of sparsevd::linear_chain: a chain of dense or CSR linear layers with an
// elementwise activation after each, in one call (a sparsified MLP pays one dispatch,
// not one module call and one op per layer and activation). Inner loops: csr_kernels.h.
//
//   - M == 1: a GEMV chain. The activations live in two small float buffers (double for
//     float64) that the layers ping-pong between; the only other allocation is the output.
//   - M > 1: the batch is cut into blocks of W columns and each block runs the whole
//     chain before the next: its input is packed once into a panel [K0][W], every layer
//     reads its input panel and writes its output panel [N][W] (the next layer's input,
//     with bias and activation fused into the stores), and the last panel is unpacked
//     into y. A block's panels stay in L2 and the activations never travel to memory.
//     W is the widest of 1..4 SIMD vectors whose two largest consecutive panels fit
//     in csr_kernels.h's panel budget. CSR layers run the SpMM of csr_linear; dense
//     layers a register-blocked GEMM micro-kernel on the panel (one ATen matmul per
//     block would cost more in call overhead than these small layers take), or ATen's
//     GEMM on the panel from 2^20 weights on (then the weight no longer stays in cache
//     from one block to the next, and MKL's blocking pays).
// Threads: blocks are shared out when there are enough of them (each thread its own
// panels); otherwise every layer splits its rows (balanced by non-zeros for CSR).
// Bounds are checked as in csr_linear: a bad index raises, naming the layer.
//
// Inference only: its autograd kernel (csrc/autograd.cpp) refuses inputs that require
// grad when grad mode is on.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../linear_chain.h"
#include "csr_kernels.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // SIMD vectors passed between inlined helpers
#endif

namespace sparsevd {

namespace {

using csr::acc_type;
using csr::BadIndex;

template <typename acc_t, typename scalar_t>
struct StoreAcc {  // out[r] = sum + b_r
  const scalar_t* bias;
  acc_t* out;
  SPARSEVD_INLINE void operator()(int64_t r, acc_t sum) const {
    out[r] = bias != nullptr ? sum + csr::to_acc<acc_t>(bias[r]) : sum;
  }
};

// Panels of `width` values per row: 1..4 SIMD vectors of VB bytes, or one of VB / 2 (in
// the AVX2 / AVX-512 builds).
template <int VB, typename scalar_t, typename acc_t>
SPARSEVD_INLINE bool spmm_panel(int64_t width, const int32_t* crow, const int32_t* col,
                                const scalar_t* val, uint32_t nnz, const acc_t* P, uint32_t K,
                                const scalar_t* bias, int64_t act, acc_t param, acc_t* Q,
                                int64_t r0, int64_t r1, BadIndex& bad) {
  constexpr int64_t L = csr::Simd<acc_t, VB>::kLanes;
  if constexpr (VB >= 32) {
    if (width < L)
      return csr::spmm_rows_to_panel<VB / 2, 1>(crow, col, val, nnz, P, K, bias, act, param, Q, r0, r1, bad);
  }
  switch (width / L) {
    case 1: return csr::spmm_rows_to_panel<VB, 1>(crow, col, val, nnz, P, K, bias, act, param, Q, r0, r1, bad);
    case 2: return csr::spmm_rows_to_panel<VB, 2>(crow, col, val, nnz, P, K, bias, act, param, Q, r0, r1, bad);
    case 3: return csr::spmm_rows_to_panel<VB, 3>(crow, col, val, nnz, P, K, bias, act, param, Q, r0, r1, bad);
    default: return csr::spmm_rows_to_panel<VB, 4>(crow, col, val, nnz, P, K, bias, act, param, Q, r0, r1, bad);
  }
}

template <int VB, typename scalar_t, typename acc_t>
SPARSEVD_INLINE void dense_panel(int64_t width, const scalar_t* w, int64_t K, const acc_t* P,
                                 const scalar_t* bias, int64_t act, acc_t param, acc_t* Q,
                                 int64_t r0, int64_t r1) {
  constexpr int64_t L = csr::Simd<acc_t, VB>::kLanes;
  if constexpr (VB >= 32) {
    if (width < L) return csr::dense_rows_to_panel<VB / 2, 1>(w, K, P, bias, act, param, Q, r0, r1);
  }
  switch (width / L) {
    case 1: return csr::dense_rows_to_panel<VB, 1>(w, K, P, bias, act, param, Q, r0, r1);
    case 2: return csr::dense_rows_to_panel<VB, 2>(w, K, P, bias, act, param, Q, r0, r1);
    case 3: return csr::dense_rows_to_panel<VB, 3>(w, K, P, bias, act, param, Q, r0, r1);
    default: return csr::dense_rows_to_panel<VB, 4>(w, K, P, bias, act, param, Q, r0, r1);
  }
}

// ---------------------------------------------------------------------------------------
// Per-ISA entry points: same body, different code generation.

#define SPARSEVD_DEFINE_ISA(SUFFIX, VB, ATTR)                                                  \
  template <typename scalar_t>                                                                \
  ATTR bool gemv_##SUFFIX(const int32_t* crow, const int32_t* col, const scalar_t* val,       \
                          uint32_t nnz, const acc_type<scalar_t>* x, uint32_t K,              \
                          const scalar_t* bias, acc_type<scalar_t>* out, int64_t r0,          \
                          int64_t r1, BadIndex& bad) {                                        \
    using acc_t = acc_type<scalar_t>;                                                         \
    return csr::gemv_rows<scalar_t, acc_t, acc_t>(crow, col, val, nnz, x, K, r0, r1,          \
                                                  StoreAcc<acc_t, scalar_t>{bias, out}, bad); \
  }                                                                                           \
  template <typename scalar_t>                                                                \
  ATTR void dense_gemv_##SUFFIX(const scalar_t* w, int64_t K, const acc_type<scalar_t>* x,    \
                                const scalar_t* bias, acc_type<scalar_t>* out, int64_t r0,    \
                                int64_t r1) {                                                 \
    using acc_t = acc_type<scalar_t>;                                                         \
    csr::dense_gemv_rows<VB>(w, x, K, r0, r1, StoreAcc<acc_t, scalar_t>{bias, out});          \
  }                                                                                           \
  template <typename acc_t>                                                                   \
  ATTR void act_##SUFFIX(acc_t* v, int64_t n, int64_t act, acc_t p) {                         \
    csr::act_inplace<VB>(v, n, act, p);                                                       \
  }                                                                                           \
  template <typename scalar_t>                                                                \
  ATTR bool spmm_##SUFFIX(int64_t width, const int32_t* crow, const int32_t* col,                    \
                          const scalar_t* val, uint32_t nnz, const acc_type<scalar_t>* P,     \
                          uint32_t K, const scalar_t* bias, int64_t act,                      \
                          acc_type<scalar_t> param, acc_type<scalar_t>* Q, int64_t r0,        \
                          int64_t r1, BadIndex& bad) {                                        \
    return spmm_panel<VB>(width, crow, col, val, nnz, P, K, bias, act, param, Q, r0, r1, bad);   \
  }                                                                                           \
  template <typename scalar_t>                                                                \
  ATTR void dense_##SUFFIX(int64_t width, const scalar_t* w, int64_t K,                              \
                           const acc_type<scalar_t>* P, const scalar_t* bias, int64_t act,    \
                           acc_type<scalar_t> param, acc_type<scalar_t>* Q, int64_t r0,       \
                           int64_t r1) {                                                      \
    dense_panel<VB>(width, w, K, P, bias, act, param, Q, r0, r1);                                \
  }                                                                                           \
  template <typename scalar_t>                                                                \
  ATTR void bias_act_##SUFFIX(acc_type<scalar_t>* Q, int64_t W, const scalar_t* bias,         \
                              int64_t act, acc_type<scalar_t> param, int64_t r0, int64_t r1) { \
    csr::bias_act_rows<VB>(Q, W, bias, act, param, r0, r1);                                   \
  }                                                                                           \
  template <typename scalar_t>                                                                \
  ATTR void pack_##SUFFIX(const scalar_t* x, int64_t sm, int64_t sk, int64_t m0,              \
                          int64_t valid, int64_t K, int64_t W, acc_type<scalar_t>* P) {       \
    csr::pack_panel<VB>(x, sm, sk, m0, valid, K, W, P);                                       \
  }                                                                                           \
  template <typename scalar_t>                                                                \
  ATTR void unpack_##SUFFIX(const acc_type<scalar_t>* P, int64_t W, int64_t N, int64_t m0,    \
                            int64_t valid, scalar_t* y) {                                     \
    csr::unpack_panel(P, W, N, m0, valid, y);                                                 \
  }

SPARSEVD_DEFINE_ISA(portable, 16, )
#if SPARSEVD_X86
SPARSEVD_DEFINE_ISA(avx2, 32, SPARSEVD_TARGET_AVX2)
SPARSEVD_DEFINE_ISA(avx512, 64, SPARSEVD_TARGET_AVX512)

SPARSEVD_TARGET_AVX512 bool gemv_f32_avx512(const int32_t* crow, const int32_t* col,
                                            const float* val, uint32_t nnz, const float* x,
                                            uint32_t K, const float* bias, float* out, int64_t r0,
                                            int64_t r1, BadIndex& bad) {
  return csr::gemv_f32_avx512_gather(crow, col, val, nnz, x, K, bias, out, r0, r1, bad);
}
#endif
#undef SPARSEVD_DEFINE_ISA

template <typename scalar_t>
struct Kernels {
  using acc_t = acc_type<scalar_t>;
  bool (*gemv)(const int32_t*, const int32_t*, const scalar_t*, uint32_t, const acc_t*, uint32_t,
               const scalar_t*, acc_t*, int64_t, int64_t, BadIndex&);
  void (*dense_gemv)(const scalar_t*, int64_t, const acc_t*, const scalar_t*, acc_t*, int64_t,
                     int64_t);
  void (*act)(acc_t*, int64_t, int64_t, acc_t);
  bool (*spmm)(int64_t, const int32_t*, const int32_t*, const scalar_t*, uint32_t, const acc_t*,
               uint32_t, const scalar_t*, int64_t, acc_t, acc_t*, int64_t, int64_t, BadIndex&);
  void (*dense)(int64_t, const scalar_t*, int64_t, const acc_t*, const scalar_t*, int64_t, acc_t,
                acc_t*, int64_t, int64_t);
  void (*bias_act)(acc_t*, int64_t, const scalar_t*, int64_t, acc_t, int64_t, int64_t);
  void (*pack)(const scalar_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, acc_t*);
  void (*unpack)(const acc_t*, int64_t, int64_t, int64_t, int64_t, scalar_t*);
  int64_t lanes;  // acc_t values per SIMD vector
  bool half;      // half-vector panels exist
};

#define SPARSEVD_KERNELS(SUFFIX, BYTES)                                                      \
  Kernels<scalar_t> {                                                                       \
    &gemv_##SUFFIX<scalar_t>, &dense_gemv_##SUFFIX<scalar_t>, &act_##SUFFIX<acc_t>,         \
        &spmm_##SUFFIX<scalar_t>, &dense_##SUFFIX<scalar_t>, &bias_act_##SUFFIX<scalar_t>,  \
        &pack_##SUFFIX<scalar_t>,                                                           \
        &unpack_##SUFFIX<scalar_t>, BYTES / static_cast<int64_t>(sizeof(acc_t)), BYTES >= 32 \
  }

template <typename scalar_t>
const Kernels<scalar_t>& kernels() {
  using acc_t = acc_type<scalar_t>;
  static const Kernels<scalar_t> chosen = []() -> Kernels<scalar_t> {
    switch (vm::cpu_isa()) {
#if SPARSEVD_X86
      case vm::Isa::kAvx512: {
        auto k = SPARSEVD_KERNELS(avx512, 64);
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (csr::use_gathers()) k.gemv = &gemv_f32_avx512;
        }
        return k;
      }
      case vm::Isa::kAvx2: return SPARSEVD_KERNELS(avx2, 32);
#endif
      default: return SPARSEVD_KERNELS(portable, 16);
    }
  }();
  return chosen;
}
#undef SPARSEVD_KERNELS

template <typename scalar_t>
const scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

// M == 1: one layer after the other on two float buffers.
template <typename scalar_t>
BadIndex chain_gemv(const at::Tensor& x, const std::vector<ChainLayer>& layers, at::Tensor& y) {
  using acc_t = acc_type<scalar_t>;
  const auto& k = kernels<scalar_t>();
  int64_t widest = x.size(1);
  for (const auto& l : layers) widest = std::max(widest, l.N);
  // Small chains keep their two buffers on the stack (an allocation costs as much as a
  // small layer).
  constexpr int64_t kStackBytes = 16 << 10;
  alignas(64) char stack[kStackBytes];
  at::Tensor scratch;
  acc_t* base = reinterpret_cast<acc_t*>(stack);
  if (2 * widest * int64_t(sizeof(acc_t)) > kStackBytes) {
    scratch = at::empty({2 * widest}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    base = scratch.mutable_data_ptr<acc_t>();
  }
  acc_t* buf[2] = {base, base + widest};
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  const int64_t sx = x.stride(1);
  const acc_t* in;
  if (std::is_same_v<scalar_t, acc_t> && sx == 1) {
    in = reinterpret_cast<const acc_t*>(x_p);
  } else {
    for (int64_t i = 0; i < x.size(1); ++i) buf[1][i] = csr::to_acc<acc_t>(x_p[i * sx]);
    in = buf[1];
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    const ChainLayer& l = layers[i];
    acc_t* out = buf[i % 2];
    const scalar_t* w = l.weight.const_data_ptr<scalar_t>();
    const scalar_t* bias = ptr_or_null<scalar_t>(l.bias);
    if (l.sparse) {
      const int32_t* crow = l.crow.const_data_ptr<int32_t>();
      const int32_t* col = l.col.const_data_ptr<int32_t>();
      BadIndex bad = csr::for_rows_balanced(crow, l.N, l.nnz + l.N, [&](int64_t r0, int64_t r1, BadIndex& b) {
        k.gemv(crow, col, w, static_cast<uint32_t>(l.nnz), in, csr::col_limit(l.K), bias, out, r0, r1, b);
      });
      if (!bad.ok()) {
        bad.layer = static_cast<int64_t>(i);
        return bad;
      }
    } else {
      csr::for_rows(l.N, l.N * l.K, std::max<int64_t>(1, csr::kSerialWork / std::max<int64_t>(l.K, 1)),
                    [&](int64_t r0, int64_t r1) { k.dense_gemv(w, l.K, in, bias, out, r0, r1); });
    }
    k.act(out, l.N, l.act, static_cast<acc_t>(l.param));
    in = out;
  }
  scalar_t* y_p = y.mutable_data_ptr<scalar_t>();
  for (int64_t n = 0; n < y.size(1); ++n) y_p[n] = static_cast<scalar_t>(in[n]);
  return BadIndex{};
}

// Dense layers from this many weights on use ATen's GEMM (chain_panels).
constexpr int64_t kAtenDenseWeights = int64_t(1) << 20;

// M > 1: batch blocks through the whole chain in panels.
template <typename scalar_t>
BadIndex chain_panels(const at::Tensor& x, const std::vector<ChainLayer>& layers, at::Tensor& y) {
  using acc_t = acc_type<scalar_t>;
  const auto& k = kernels<scalar_t>();
  const int64_t M = x.size(0), K0 = x.size(1), N_out = y.size(1);
  int64_t widest = K0, pair = 0, work = 0;
  for (const auto& l : layers) {
    widest = std::max(widest, l.N);
    pair = std::max(pair, l.K + l.N);
    work += (l.sparse ? l.nnz : l.N * l.K) + l.N;
  }
  int64_t vectors = 4;
  while (vectors > 1 && pair * vectors * k.lanes * int64_t(sizeof(acc_t)) > csr::kPanelBytes)
    vectors /= 2;
  const csr::Blocks blocks(M, k.lanes, vectors, k.half);
  const int64_t panel = widest * blocks.panel_width(0);  // block 0 is the widest
  work *= M;
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const scalar_t* x_p = x.const_data_ptr<scalar_t>();
  scalar_t* y_p = y.mutable_data_ptr<scalar_t>();
  // Large dense layers go to ATen's GEMM on each block's panel: the micro-kernel would
  // stream their weight from memory once per block. Their weight in acc_t, made once.
  std::vector<at::Tensor> gemm_weight(layers.size());
  for (size_t i = 0; i < layers.size(); ++i)
    if (!layers[i].sparse && layers[i].N * layers[i].K >= kAtenDenseWeights)
      gemm_weight[i] = layers[i].weight.to(acc_options.dtype());

  // The chain for block b with the two panels A and B (each widest × its width).
  auto run_block = [&](int64_t b, acc_t* A, acc_t* B) -> BadIndex {
    const int64_t m0 = blocks.m0(b), valid = blocks.valid(b);
    const int64_t pw = blocks.panel_width(b);
    k.pack(x_p, x.stride(0), x.stride(1), m0, valid, K0, pw, A);
    acc_t* in = A;
    acc_t* out = B;
    for (size_t i = 0; i < layers.size(); ++i) {
      const ChainLayer& l = layers[i];
      const scalar_t* w = l.weight.const_data_ptr<scalar_t>();
      const scalar_t* bias = ptr_or_null<scalar_t>(l.bias);
      const acc_t param = static_cast<acc_t>(l.param);
      if (l.sparse) {
        const int32_t* crow = l.crow.const_data_ptr<int32_t>();
        const int32_t* col = l.col.const_data_ptr<int32_t>();
        BadIndex bad = csr::for_rows_balanced(
            crow, l.N, (l.nnz + l.N) * pw, [&](int64_t r0, int64_t r1, BadIndex& e) {
              k.spmm(pw, crow, col, w, static_cast<uint32_t>(l.nnz), in, csr::col_limit(l.K),
                     bias, l.act, param, out, r0, r1, e);
            });
        if (!bad.ok()) {
          bad.layer = static_cast<int64_t>(i);
          return bad;
        }
      } else if (gemm_weight[i].defined()) {
        at::Tensor Q = at::from_blob(out, {l.N, pw}, acc_options);
        at::mm_out(Q, gemm_weight[i], at::from_blob(in, {l.K, pw}, acc_options));
        k.bias_act(out, pw, bias, l.act, param, 0, l.N);
      } else {
        csr::for_rows(l.N, l.N * l.K * pw,
                      std::max<int64_t>(8, csr::kSerialWork / std::max<int64_t>(l.K * pw, 1)),
                      [&](int64_t r0, int64_t r1) {
                        k.dense(pw, w, l.K, in, bias, l.act, param, out, r0, r1);
                      });
      }
      std::swap(in, out);
    }
    k.unpack(in, pw, N_out, m0, valid, y_p);
    return BadIndex{};
  };

  if (blocks.split_blocks(work)) {
    std::vector<BadIndex> bad(blocks.count);
    csr::run_tasks(
        blocks.count, [&] { return at::empty({2 * panel}, acc_options); },
        [&](int64_t b, at::Tensor& scratch) {
          acc_t* A = scratch.mutable_data_ptr<acc_t>();
          bad[b] = run_block(b, A, A + panel);
        });
    return csr::first_bad(bad);
  }
  at::Tensor scratch = at::empty({2 * panel}, acc_options);
  acc_t* A = scratch.mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < blocks.count; ++b) {
    BadIndex bad = run_block(b, A, A + panel);
    if (!bad.ok()) return bad;
  }
  return BadIndex{};
}

at::Tensor linear_chain_cpu(const at::Tensor& x, at::TensorList weights,
                            const OptionalTensorList& crow_indices,
                            const OptionalTensorList& col_indices, const OptionalTensorList& biases,
                            at::IntArrayRef activations, at::ArrayRef<double> activation_params) {
  const std::vector<ChainLayer> layers = linear_chain_layers(
      x, weights, crow_indices, col_indices, biases, activations, activation_params);
  TORCH_CHECK(x.device().is_cpu(), "sparsevd::linear_chain: the CPU kernel got x on ", x.device());
  for (size_t i = 0; i < layers.size(); ++i) {
    const ChainLayer& l = layers[i];
    if (!l.sparse) continue;
    const int32_t first = l.crow.const_data_ptr<int32_t>()[0];
    const int32_t last = l.crow.const_data_ptr<int32_t>()[l.N];
    TORCH_CHECK(first == 0 && last == l.nnz, "sparsevd::linear_chain: layer ", i,
                ": crow_indices must start at 0 and end at nnz = ", l.nnz, ", got ", first,
                " and ", last);
  }
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, layers.back().N}, x.options());
  if (M == 0) return y;
  BadIndex bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_chain_cpu", [&] {
    bad = M == 1 ? chain_gemv<scalar_t>(x, layers, y) : chain_panels<scalar_t>(x, layers, y);
  });
  if (!bad.ok()) {
    const ChainLayer& l = layers[bad.layer];
    csr::raise_bad_index("sparsevd::linear_chain: layer " + std::to_string(bad.layer), bad, l.K, l.nnz);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) { m.impl("linear_chain", &linear_chain_cpu); }

}  // namespace sparsevd
