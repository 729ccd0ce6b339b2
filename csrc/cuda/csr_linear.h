// The CUDA csr_linear of one layer, shared by the csr_linear and linear_chain kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace sparsevd {

// y = x·Wᵀ + b on the current stream, for checked arguments on x's device (the guard is
// the caller's); bias and row_order contiguous or undefined. No synchronization:
// CUDA-graph capturable. Defined in csr_linear.cpp.
at::Tensor csr_linear_cuda_run(const at::Tensor& x, const at::Tensor& crow_indices,
                               const at::Tensor& col_indices, const at::Tensor& values,
                               const at::Tensor& bias, const at::Tensor& row_order);

}  // namespace sparsevd
