// sparsevd::linear_chain, shared by its CPU and CUDA kernels: the layers of a chain,
// checked once per call (O(1) per layer: shapes, dtypes, devices, codes).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace sparsevd {

// One layer, its tensors made contiguous. Dense: `weight` [N, K]. CSR: `weight` holds the
// values [nnz], `crow` [N + 1] and `col` [nnz] are int32. `bias` is undefined if absent.
struct ChainLayer {
  at::Tensor weight, crow, col, bias;
  bool sparse = false;
  int64_t N = 0, K = 0, nnz = 0;
  int64_t act = 0;
  double param = 0.0;
};

// Checks the arguments of linear_chain (its schema: sparsevd/_ops.py) and returns its layers.
// Defined in csrc/cpu/linear_chain.cpp (always built).
std::vector<ChainLayer> linear_chain_layers(const at::Tensor& x, at::TensorList weights,
                                            const c10::List<std::optional<at::Tensor>>& crow_indices,
                                            const c10::List<std::optional<at::Tensor>>& col_indices,
                                            const c10::List<std::optional<at::Tensor>>& biases,
                                            at::IntArrayRef activations,
                                            at::ArrayRef<double> activation_params);

}  // namespace sparsevd
