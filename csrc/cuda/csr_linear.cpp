// CUDA glue of sparsevd::csr_linear: argument checks, allocation, stream and choice of
// regime; the kernels are in csr_spmm.cu (compiled by nvcc without torch headers).
// Invalid CSR structure cannot raise here without a synchronization: the kernels give
// the affected rows NaN outputs instead (csr_spmm.h). Unsorted or repeated columns are not
// invalid to the kernels: they sum every entry, as on the CPU. A row_order that is not a
// permutation (not checked here: its owner checks it) would leave the rows it misses
// unwritten.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../csr_linear_checks.h"
#include "csr_linear.h"
#include "csr_spmm.h"

namespace sparsevd {

namespace {

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kDouble: return cuda::DType::kFloat64;
    default:
      TORCH_CHECK(false, "sparsevd::csr_linear: the CUDA kernel supports float32, float16, ",
                  "bfloat16 and float64, got ", t);
  }
  return cuda::DType::kFloat32;  // unreachable
}

}  // namespace

at::Tensor csr_linear_cuda_run(const at::Tensor& x, const at::Tensor& crow_indices,
                               const at::Tensor& col_indices, const at::Tensor& values,
                               const at::Tensor& bias, const at::Tensor& row_order) {
  const cuda::DType dtype = to_kernel_dtype(x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t N = crow_indices.numel() - 1;
  const int64_t nnz = values.numel();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  // nnz == 0 still runs the kernel, which checks every row's range (all must be empty).
  const at::Tensor crow = crow_indices.contiguous();
  const at::Tensor col = col_indices.contiguous();
  const at::Tensor val = values.contiguous();
  cuda::CsrArgs w{crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(),
                  val.const_data_ptr(), bias.defined() ? bias.const_data_ptr() : nullptr,
                  row_order.defined() ? row_order.const_data_ptr<int32_t>() : nullptr, N, nnz, K};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (cuda::use_small_m(M, N)) {
    C10_CUDA_CHECK(cuda::csr_linear_small_m(dtype, x.const_data_ptr(), x.stride(0), x.stride(1),
                                            w, y.mutable_data_ptr(), M, stream));
    return y;
  }
  // xᵀ [K, ldx]. An x that is already the transpose of a contiguous [K, M] tensor with
  // aligned rows is used in place; otherwise one transpose kernel pads and copies it.
  const int64_t ldx = cuda::transposed_ld(M);
  const bool in_place = K > 0 && x.stride(1) == M && x.stride(0) == 1 && ldx == M &&
                        reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
  at::Tensor xt;
  const void* xt_p = x.const_data_ptr();
  if (!in_place) {
    xt = at::empty({K, ldx}, x.options());
    C10_CUDA_CHECK(cuda::transpose_pad(dtype, x.const_data_ptr(), x.stride(0), x.stride(1),
                                       xt.mutable_data_ptr(), ldx, M, K, stream));
    xt_p = xt.const_data_ptr();
  }
  C10_CUDA_CHECK(cuda::csr_linear_large_m(dtype, xt_p, ldx, w, y.mutable_data_ptr(), M, stream));
  return y;
}

namespace {

at::Tensor csr_linear_cuda(const at::Tensor& x, const at::Tensor& crow_indices,
                           const at::Tensor& col_indices, const at::Tensor& values,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& row_order) {
  csr_linear_check_args(x, crow_indices, col_indices, values, bias, row_order);
  TORCH_CHECK(x.is_cuda(), "sparsevd::csr_linear: the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_order = row_order.has_value() && row_order->defined();
  return csr_linear_cuda_run(x, crow_indices, col_indices, values,
                             has_bias ? bias->contiguous() : at::Tensor(),
                             has_order ? row_order->contiguous() : at::Tensor());
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsevd, CUDA, m) { m.impl("csr_linear", &csr_linear_cuda); }

}  // namespace sparsevd
