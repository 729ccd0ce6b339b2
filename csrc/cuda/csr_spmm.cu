// CUDA CSR SpMM for sparsevd::csr_linear: y[M, N] = x[M, K] · Wᵀ + b, W [N, K] in CSR
// (rows = output features, int32 indices), float / half / bfloat16 with fp32
// accumulation (float64 with fp64 accumulation, for gradcheck and tests). In the style
// of Sputnik (Gale et al., "Sparse GPU Kernels for Deep Learning", SC20): one sub-warp
// per row, rows optionally scheduled in an order given by the caller (longest first
// balances the load), vector loads along the batch dimension, several short rows per
// warp, bias fused in the epilogue.
//
// Two regimes (use_small_m picks one from M and N):
//   small M (GEMV-like: M <= 16, or M <= 64 with few rows): a group of G lanes (4..32,
//     from the mean row length) splits a row's non-zeros; each lane gathers x[m, col]
//     for a tile of MT <= 8 batch rows straight from x (any strides), and the group
//     reduces with xor shuffles. Batch tiles are separate grid rows (blockIdx.y).
//   large M: x is first transposed to xᵀ [K, ldx] (ldx = M padded to 8, zero-filled;
//     skipped when x is already a transposed contiguous [K, M] tensor); a sub-warp of
//     SUB lanes owns a row and a tile of the batch, loads a chunk of SUB (col, value)
//     pairs cooperatively, broadcasts them with shuffles, and every lane does vector
//     loads of xᵀ[col, its batch slice] (4, 8 or 16 bytes: the widest that still gives
//     32 lanes per row) and FMAs into VPT <= 4 vectors of accumulators.
// Long rows are summed in chunks of 64 non-zeros (two-level summation) so that the
// rounding error stays near that of a blocked dense GEMM.
// Bounds (see csr_spmm.h): every row range and column index is checked where it is
// read; an invalid row reads nothing through the bad index and writes NaN.
// Output stores are y[m, row] (stride N between batch entries): a row of W is a
// column of y. The output tile of a CTA stays in L2, which merges the partial sectors.
//
// No torch headers here (nvcc compiles this file in seconds); see csr_spmm.h.
#include "csr_spmm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace sparsevd {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation type: fp32, fp64 for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ double to_f(double v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(acc_of<T> v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_f<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename A>
__device__ __forceinline__ A nan_of();
template <>
__device__ __forceinline__ float nan_of<float>() { return CUDART_NAN_F; }
template <>
__device__ __forceinline__ double nan_of<double>() { return CUDART_NAN; }

// Row `row`'s non-zeros [start, end) if 0 <= start <= end <= nnz; otherwise false and
// an empty range (unsigned compares: a negative index is huge).
__device__ __forceinline__ bool row_range(const int32_t* __restrict__ crow, int64_t row,
                                          int64_t nnz, int& start, int& end) {
  const int s = crow[row], e = crow[row + 1];
  const bool ok = static_cast<unsigned>(s) <= static_cast<unsigned>(e) &&
                  static_cast<uint64_t>(static_cast<unsigned>(e)) <= static_cast<uint64_t>(nnz);
  start = ok ? s : 0;
  end = ok ? e : 0;
  return ok;
}

// Lanes of the aligned group of G lanes that holds this lane (for *_sync masks).
template <int G>
__device__ __forceinline__ unsigned group_mask(int lane) {
  if constexpr (G == 32) {
    return kFullMask;
  } else {
    return ((1u << G) - 1u) << (lane & ~(G - 1));
  }
}

// Two 16-bit floats packed in a 32-bit word, widened to fp32.
template <typename T>
__device__ __forceinline__ void widen2(uint32_t word, float& lo, float& hi) {
  if constexpr (std::is_same<T, __half>::value) {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
  } else {
    // bfloat16 is the upper half of a float32.
    lo = __uint_as_float(word << 16);
    hi = __uint_as_float(word & 0xffff0000u);
  }
}

// VB bytes (4, 8 or 16) = kVec elements of T, loaded at once through the read-only
// path and widened to the accumulation type. The address must be VB-byte aligned.
template <typename T, int VB>
struct VecLoad {
  static_assert(VB == 4 || VB == 8 || VB == 16, "vector loads of 4, 8 or 16 bytes");
  static_assert(VB >= static_cast<int>(sizeof(T)), "a vector holds at least one element");
  static constexpr int kVec = VB / static_cast<int>(sizeof(T));
  static constexpr int kWords = VB / 4;
  __device__ __forceinline__ static void load(const T* __restrict__ p, acc_of<T> (&out)[kVec]) {
    uint32_t w[kWords];
    if constexpr (VB == 16) {
      const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = r.x;
      w[1] = r.y;
      w[2] = r.z;
      w[3] = r.w;
    } else if constexpr (VB == 8) {
      const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = r.x;
      w[1] = r.y;
    } else {
      w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    }
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      if constexpr (sizeof(T) == 8) {
        if (i % 2 == 0) out[i / 2] = __hiloint2double(static_cast<int>(w[i + 1]), static_cast<int>(w[i]));
      } else if constexpr (sizeof(T) == 4) {
        out[i] = __uint_as_float(w[i]);
      } else {
        widen2<T>(w[i], out[2 * i], out[2 * i + 1]);
      }
    }
  }
};

// ------------------------------------------------------------------------------------
// Small M: G lanes per row, MT batch rows per CTA row of the grid (blockIdx.y).

constexpr int kSmallBlock = 256;

template <typename T, int MT, int G>
__global__ void __launch_bounds__(kSmallBlock)
    csr_small_m_kernel(const T* __restrict__ x, int64_t sxm, int64_t sxk,
                       const int32_t* __restrict__ crow, const int32_t* __restrict__ col,
                       const T* __restrict__ val, const T* __restrict__ bias,
                       const int32_t* __restrict__ perm, T* __restrict__ y, int64_t M,
                       int64_t N, int64_t nnz, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int g_lane = lane & (G - 1);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (kSmallBlock / G) + threadIdx.x / G;
  if (i >= N) return;  // the whole group leaves together
  const unsigned mask = group_mask<G>(lane);
  const int64_t row = perm != nullptr ? perm[i] : i;
  if (row < 0 || row >= N) return;  // a bad schedule entry: the group skips it
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT;
  const int64_t valid = M - m0 < MT ? M - m0 : MT;
  // Batch rows past M read the last valid one again (no branch in the loop).
  const T* xr[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) xr[t] = x + (m0 + (t < valid ? t : valid - 1)) * sxm;

  using acc_t = acc_of<T>;
  acc_t acc[MT];
#pragma unroll
  for (int t = 0; t < MT; ++t) acc[t] = acc_t(0);
  int start, end;
  bool bad = !row_range(crow, row, nnz, start, end);
#pragma unroll 2
  for (int j = start + g_lane; j < end; j += G) {
    const int cj = __ldg(col + j);
    if (static_cast<uint64_t>(static_cast<unsigned>(cj)) >= static_cast<uint64_t>(K)) {
      bad = true;  // never read through it
      continue;
    }
    const int64_t c = static_cast<int64_t>(cj) * sxk;
    const acc_t v = to_f(val[j]);
#pragma unroll
    for (int t = 0; t < MT; ++t) acc[t] += v * to_f(xr[t][c]);
  }
  if (bad) {
#pragma unroll
    for (int t = 0; t < MT; ++t) acc[t] = nan_of<acc_t>();  // the group's sums below spread it
  }
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int t = 0; t < MT; ++t) acc[t] += __shfl_xor_sync(mask, acc[t], off);
  }
  const acc_t b = bias != nullptr ? to_f(bias[row]) : acc_t(0);
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    if (t % G == g_lane && t < valid) y[(m0 + t) * N + row] = from_f<T>(acc[t] + b);
  }
}

// ------------------------------------------------------------------------------------
// Large M: SUB lanes per row; lane s owns the 16-byte vectors p·SUB + s (p < VPT) of the
// batch tile blockIdx.y, so that for each p the sub-warp reads SUB·16 contiguous bytes.

constexpr int kLargeBlock = 128;
constexpr int kSumChunk = 64;  // a multiple of every SUB

template <typename T, int VB, int SUB, int VPT>
__global__ void __launch_bounds__(kLargeBlock)
    csr_large_m_kernel(const T* __restrict__ xt, int64_t ldx, const int32_t* __restrict__ crow,
                       const int32_t* __restrict__ col, const T* __restrict__ val,
                       const T* __restrict__ bias, const int32_t* __restrict__ perm,
                       T* __restrict__ y, int64_t M, int64_t N, int64_t nnz, int64_t K) {
  constexpr int V = VecLoad<T, VB>::kVec;
  const int lane = threadIdx.x & 31;
  const int s_lane = lane & (SUB - 1);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (kLargeBlock / SUB) + threadIdx.x / SUB;
  if (i >= N) return;  // the whole sub-warp leaves together
  const unsigned mask = group_mask<SUB>(lane);
  const int64_t row = perm != nullptr ? perm[i] : i;
  if (row < 0 || row >= N) return;  // a bad schedule entry: the sub-warp skips it
  const int64_t tile0 = static_cast<int64_t>(blockIdx.y) * SUB * VPT * V;

  int64_t mcol[VPT];
  bool active[VPT];
#pragma unroll
  for (int p = 0; p < VPT; ++p) {
    mcol[p] = tile0 + static_cast<int64_t>(p * SUB + s_lane) * V;
    active[p] = mcol[p] < ldx;  // ldx is a multiple of V: a vector is all in or all out
  }
  using acc_t = acc_of<T>;
  acc_t acc[VPT][V];
#pragma unroll
  for (int p = 0; p < VPT; ++p)
#pragma unroll
    for (int e = 0; e < V; ++e) acc[p][e] = acc_t(0);

  int start, end;
  // The same for every lane of the sub-warp: the row's range, and (broadcast below)
  // each column index, so the sub-warp skips a bad one together.
  bool bad = !row_range(crow, row, nnz, start, end);
  // Two-level summation: a fresh partial sum per kSumChunk non-zeros keeps the rounding
  // error of long rows near that of a blocked dense GEMM.
  for (int chunk = start; chunk < end; chunk += kSumChunk) {
    const int chunk_end = end - chunk < kSumChunk ? end : chunk + kSumChunk;
    acc_t part[VPT][V];
#pragma unroll
    for (int p = 0; p < VPT; ++p)
#pragma unroll
      for (int e = 0; e < V; ++e) part[p][e] = acc_t(0);
    for (int base = chunk; base < chunk_end; base += SUB) {
      const int j = base + s_lane;
      int c = 0;
      acc_t v = acc_t(0);
      if (j < chunk_end) {
        c = __ldg(col + j);
        v = to_f(val[j]);
      }
      const int count = chunk_end - base < SUB ? chunk_end - base : SUB;
#pragma unroll 4
      for (int t = 0; t < count; ++t) {
        const int ct = __shfl_sync(mask, c, t, SUB);
        const acc_t vt = __shfl_sync(mask, v, t, SUB);
        if (static_cast<uint64_t>(static_cast<unsigned>(ct)) >= static_cast<uint64_t>(K)) {
          bad = true;  // never read through it
          continue;
        }
        const T* xr = xt + static_cast<int64_t>(ct) * ldx;
#pragma unroll
        for (int p = 0; p < VPT; ++p) {
          if (active[p]) {
            acc_t xv[V];
            VecLoad<T, VB>::load(xr + mcol[p], xv);
#pragma unroll
            for (int e = 0; e < V; ++e) part[p][e] += vt * xv[e];
          }
        }
      }
    }
#pragma unroll
    for (int p = 0; p < VPT; ++p)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[p][e] += part[p][e];
  }
  const acc_t b = bias != nullptr ? to_f(bias[row]) : acc_t(0);
#pragma unroll
  for (int p = 0; p < VPT; ++p) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t m = mcol[p] + e;
      if (m < M) y[m * N + row] = from_f<T>(bad ? nan_of<acc_t>() : acc[p][e] + b);
    }
  }
}

// ------------------------------------------------------------------------------------
// xt[k, m] = x[m, k] (m < M), 0 (M <= m < ldx): 32 × 32 tiles through shared memory.

template <typename T>
__global__ void __launch_bounds__(256)
    transpose_pad_kernel(const T* __restrict__ x, int64_t sxm, int64_t sxk, T* __restrict__ xt,
                         int64_t ldx, int64_t M, int64_t K) {
  __shared__ T tile[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;  // 32 × 8
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * 32;
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * 32; m0 < ldx;
       m0 += static_cast<int64_t>(gridDim.y) * 32) {
#pragma unroll
    for (int r = ty; r < 32; r += 8) {
      const int64_t m = m0 + r, k = k0 + tx;
      tile[r][tx] = (m < M && k < K) ? x[m * sxm + k * sxk] : from_f<T>(acc_of<T>(0));
    }
    __syncthreads();
#pragma unroll
    for (int r = ty; r < 32; r += 8) {
      const int64_t k = k0 + r, m = m0 + tx;
      if (k < K && m < ldx) xt[k * ldx + m] = tile[tx][r];
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------
// Host-side selection of the template instances.

int pow2_ceil(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

template <typename T, int MT, int G>
void launch_small(const T* x, int64_t sxm, int64_t sxk, const CsrArgs& w, T* y, int64_t M,
                  cudaStream_t stream) {
  const int64_t rows_per_block = kSmallBlock / G;
  const dim3 grid(static_cast<unsigned>((w.N + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>((M + MT - 1) / MT));
  csr_small_m_kernel<T, MT, G><<<grid, kSmallBlock, 0, stream>>>(
      x, sxm, sxk, w.crow, w.col, static_cast<const T*>(w.val), static_cast<const T*>(w.bias),
      w.row_perm, y, M, w.N, w.nnz, w.K);
}

template <typename T, int MT>
void dispatch_small_g(int g, const T* x, int64_t sxm, int64_t sxk, const CsrArgs& w, T* y,
                      int64_t M, cudaStream_t stream) {
  switch (g) {
    case 4: return launch_small<T, MT, 4>(x, sxm, sxk, w, y, M, stream);
    case 8: return launch_small<T, MT, 8>(x, sxm, sxk, w, y, M, stream);
    case 16: return launch_small<T, MT, 16>(x, sxm, sxk, w, y, M, stream);
    default: return launch_small<T, MT, 32>(x, sxm, sxk, w, y, M, stream);
  }
}

template <typename T>
cudaError_t small_m(const void* x, int64_t sxm, int64_t sxk, const CsrArgs& w, void* y,
                    int64_t M, cudaStream_t stream) {
  // Enough lanes per row that each does about two iterations; 4 lanes at least (so a
  // warp holds at most 8 rows), one warp at most.
  const int64_t mean_len = (w.nnz + w.N - 1) / std::max<int64_t>(w.N, 1);
  const int g = std::min(32, std::max(4, pow2_ceil((mean_len + 1) / 2)));
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  if (M == 1) dispatch_small_g<T, 1>(g, xp, sxm, sxk, w, yp, M, stream);
  else if (M == 2) dispatch_small_g<T, 2>(g, xp, sxm, sxk, w, yp, M, stream);
  else if (M <= 4) dispatch_small_g<T, 4>(g, xp, sxm, sxk, w, yp, M, stream);
  else dispatch_small_g<T, 8>(g, xp, sxm, sxk, w, yp, M, stream);
  return cudaGetLastError();
}

template <typename T, int VB, int SUB, int VPT>
void launch_large(const T* xt, int64_t ldx, const CsrArgs& w, T* y, int64_t M,
                  cudaStream_t stream) {
  constexpr int V = VecLoad<T, VB>::kVec;
  const int64_t rows_per_block = kLargeBlock / SUB;
  const int64_t tile = static_cast<int64_t>(SUB) * VPT * V;
  const dim3 grid(static_cast<unsigned>((w.N + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>((ldx + tile - 1) / tile));
  csr_large_m_kernel<T, VB, SUB, VPT><<<grid, kLargeBlock, 0, stream>>>(
      xt, ldx, w.crow, w.col, static_cast<const T*>(w.val), static_cast<const T*>(w.bias),
      w.row_perm, y, M, w.N, w.nnz, w.K);
}

template <typename T, int VB>
void dispatch_large_sub(int64_t vecs, const T* xt, int64_t ldx, const CsrArgs& w,
                        T* y, int64_t M, cudaStream_t stream) {
  if (vecs <= 4) launch_large<T, VB, 4, 1>(xt, ldx, w, y, M, stream);
  else if (vecs <= 8) launch_large<T, VB, 8, 1>(xt, ldx, w, y, M, stream);
  else if (vecs <= 16) launch_large<T, VB, 16, 1>(xt, ldx, w, y, M, stream);
  else if (vecs <= 32) launch_large<T, VB, 32, 1>(xt, ldx, w, y, M, stream);
  else if (vecs <= 64) launch_large<T, VB, 32, 2>(xt, ldx, w, y, M, stream);
  else launch_large<T, VB, 32, 4>(xt, ldx, w, y, M, stream);
}

template <typename T>
cudaError_t large_m(const void* xt, int64_t ldx, const CsrArgs& w, void* y, int64_t M,
                    cudaStream_t stream) {
  // Vector width: the widest (up to 16 bytes) that still gives a full warp of lanes per
  // row, so that short batches keep many loads in flight.
  const int64_t row_bytes = ldx * static_cast<int64_t>(sizeof(T));
  int vb = 16;
  while (vb > 4 && row_bytes < 32 * vb) vb /= 2;
  if (vb < static_cast<int>(sizeof(T))) vb = static_cast<int>(sizeof(T));
  const int64_t vecs = ldx * static_cast<int64_t>(sizeof(T)) / vb;
  const int64_t tiles_y = (vecs + 31) / 32;
  if (tiles_y > 65535) return cudaErrorInvalidConfiguration;
  const T* xp = static_cast<const T*>(xt);
  T* yp = static_cast<T*>(y);
  if constexpr (sizeof(T) <= 4) {
    if (vb == 4) {
      dispatch_large_sub<T, 4>(vecs, xp, ldx, w, yp, M, stream);
      return cudaGetLastError();
    }
  }
  if (vb == 8) dispatch_large_sub<T, 8>(vecs, xp, ldx, w, yp, M, stream);
  else dispatch_large_sub<T, 16>(vecs, xp, ldx, w, yp, M, stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t transpose(const void* x, int64_t sxm, int64_t sxk, void* xt, int64_t ldx, int64_t M,
                      int64_t K, cudaStream_t stream) {
  const int64_t tiles_k = (K + 31) / 32;
  if (tiles_k > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int64_t tiles_m = std::min<int64_t>((ldx + 31) / 32, 65535);
  const dim3 grid(static_cast<unsigned>(tiles_k), static_cast<unsigned>(tiles_m));
  transpose_pad_kernel<T><<<grid, dim3(32, 8), 0, stream>>>(
      static_cast<const T*>(x), sxm, sxk, static_cast<T*>(xt), ldx, M, K);
  return cudaGetLastError();
}

}  // namespace

bool use_small_m(int64_t M, int64_t N) {
  // SPARSEVD_CSR_SMALL_M_MAX=<m> replaces the rule below by M <= m (read once; tuning).
  static const int64_t forced = [] {
    const char* env = std::getenv("SPARSEVD_CSR_SMALL_M_MAX");
    return env != nullptr && *env != '\0' ? static_cast<int64_t>(std::atoll(env)) : int64_t(-1);
  }();
  if (forced >= 0) return M <= forced;
  // H100, 98%-sparse 4096 x 4096: the two kernels tie at M = 16-17 and the large-M one
  // wins above. With few rows (300 x 784) the large-M kernel has too few warps to hide
  // latency (M = 17: 9.6 us against 3.3 us for the small-M kernel at M = 16), so the
  // small-M kernel, whose batch tiles run side by side, is kept up to M = 64 there.
  return M <= 16 || (M <= 64 && N <= 1024);
}

int64_t transposed_ld(int64_t M) { return (M + 7) / 8 * 8; }

cudaError_t csr_linear_small_m(DType dtype, const void* x, int64_t x_stride_m,
                               int64_t x_stride_k, const CsrArgs& w, void* y, int64_t M,
                               cudaStream_t stream) {
  if (M <= 0 || w.N <= 0) return cudaSuccess;
  if ((M + 7) / 8 > 65535) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kFloat32: return small_m<float>(x, x_stride_m, x_stride_k, w, y, M, stream);
    case DType::kFloat16: return small_m<__half>(x, x_stride_m, x_stride_k, w, y, M, stream);
    case DType::kBFloat16:
      return small_m<__nv_bfloat16>(x, x_stride_m, x_stride_k, w, y, M, stream);
    case DType::kFloat64: return small_m<double>(x, x_stride_m, x_stride_k, w, y, M, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t transpose_pad(DType dtype, const void* x, int64_t x_stride_m, int64_t x_stride_k,
                          void* xt, int64_t ldx, int64_t M, int64_t K, cudaStream_t stream) {
  if (K <= 0 || ldx <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return transpose<float>(x, x_stride_m, x_stride_k, xt, ldx, M, K, stream);
    case DType::kFloat16: return transpose<__half>(x, x_stride_m, x_stride_k, xt, ldx, M, K, stream);
    case DType::kBFloat16:
      return transpose<__nv_bfloat16>(x, x_stride_m, x_stride_k, xt, ldx, M, K, stream);
    case DType::kFloat64: return transpose<double>(x, x_stride_m, x_stride_k, xt, ldx, M, K, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t csr_linear_large_m(DType dtype, const void* xt, int64_t ldx, const CsrArgs& w,
                               void* y, int64_t M, cudaStream_t stream) {
  if (M <= 0 || w.N <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return large_m<float>(xt, ldx, w, y, M, stream);
    case DType::kFloat16: return large_m<__half>(xt, ldx, w, y, M, stream);
    case DType::kBFloat16: return large_m<__nv_bfloat16>(xt, ldx, w, y, M, stream);
    case DType::kFloat64: return large_m<double>(xt, ldx, w, y, M, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparsevd
