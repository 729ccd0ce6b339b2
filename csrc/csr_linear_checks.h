// sparsevd::csr_linear's argument checks, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sparsevd {

// The O(1) checks on shapes, dtypes and devices (none reads the indices: the CPU kernel
// checks every index where it reads it, the CUDA kernel gives bad rows NaN outputs).
// Returns N, the number of output features.
int64_t csr_linear_check_args(const at::Tensor& x, const at::Tensor& crow_indices,
                              const at::Tensor& col_indices, const at::Tensor& values,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& row_order);

}  // namespace sparsevd
