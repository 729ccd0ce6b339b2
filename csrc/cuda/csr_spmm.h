// Plain C++ interface of the CUDA CSR SpMM kernels (csr_spmm.cu), free of torch headers
// so that nvcc compiles the kernels quickly. csr_linear.cpp does the argument checks,
// allocation and stream handling with torch, then calls these launchers.
//
// Problem: y[M, N] = x[M, K] · Wᵀ + b, W [N, K] in CSR with rows = output features
// (crow [N + 1], col [nnz], val [nnz], int32 indices), fp32 accumulation (fp64 for
// float64).
//
// Bounds: the kernels never read or write outside the buffers, whatever the indices. A
// row whose range is invalid (not 0 <= crow[r] <= crow[r+1] <= nnz) or that holds a
// column index outside [0, K) reads nothing through it and gets NaN outputs: a kernel
// cannot raise without a synchronization, and NaN makes the result visibly wrong
// rather than plausibly so. A row_perm entry outside [0, N) is skipped.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparsevd {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct CsrArgs {
  const int32_t* crow;      // [N + 1]
  const int32_t* col;       // [nnz]
  const void* val;          // [nnz], dtype
  const void* bias;         // [N] or nullptr
  // [N] a permutation of 0..N-1: the order in which rows are scheduled (rows sorted by
  // decreasing length balance the load, as in Sputnik), or nullptr for natural order.
  // Computed once by the caller (SparseLinear keeps it beside the CSR buffers).
  const int32_t* row_perm;
  int64_t N;
  int64_t nnz;
  int64_t K;  // columns of W (features of x): column indices must be below it
};

// Whether a batch of M rows against N output features runs the small-M kernel (x read
// in place) rather than the large-M one (x transposed to xᵀ first). The rule comes from
// H100 timings; SPARSEVD_CSR_SMALL_M_MAX=<m> overrides it with M <= m (read once).
bool use_small_m(int64_t M, int64_t N);

// Small-M regime: a group of 4–32 lanes per row splits the row's non-zeros, each lane
// gathers x[m, col] for a tile of up to 8 batch rows, and the group reduces with warp
// shuffles. x is read through its strides (in elements); y [M, N] is contiguous.
cudaError_t csr_linear_small_m(DType dtype, const void* x, int64_t x_stride_m,
                               int64_t x_stride_k, const CsrArgs& w, void* y, int64_t M,
                               cudaStream_t stream);

// Padded leading dimension of xᵀ for a batch of M: a multiple of 8 elements, so every
// row of xᵀ starts 16-byte aligned and vector loads never leave the buffer.
int64_t transposed_ld(int64_t M);

// xt[k, m] = x[m, k] for m < M, 0 for M <= m < ldx; xt [K, ldx] contiguous, same dtype.
cudaError_t transpose_pad(DType dtype, const void* x, int64_t x_stride_m, int64_t x_stride_k,
                          void* xt, int64_t ldx, int64_t M, int64_t K, cudaStream_t stream);

// Large-M regime: yᵀ = W · xᵀ with xᵀ [K, ldx] from transpose_pad (16-byte aligned base).
// A sub-warp per row walks its non-zeros; lanes span the batch with 4- to 16-byte vector
// loads of xᵀ rows.
cudaError_t csr_linear_large_m(DType dtype, const void* xt, int64_t ldx, const CsrArgs& w,
                               void* y, int64_t M, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsevd
