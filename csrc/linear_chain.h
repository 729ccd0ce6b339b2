// sparsevd::linear_chain, device-neutral: its C++ signature, the handle to call it
// through the dispatcher, and the layers of a chain as its argument checks return them
// (O(1) per layer: shapes, dtypes, devices, codes). Its schema is declared in Python
// (sparsevd/_ops.py); the signature here must match it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace sparsevd {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// linear_chain(x, weights, crow_indices, col_indices, biases, activations, activation_params)
using LinearChainSignature = at::Tensor(const at::Tensor&, at::TensorList, const OptionalTensorList&,
                                        const OptionalTensorList&, const OptionalTensorList&,
                                        at::IntArrayRef, at::ArrayRef<double>);

// The op as registered, for callers that go through the dispatcher (the bound chain of
// module.cpp, the autograd kernel going below autograd).
inline const c10::TypedOperatorHandle<LinearChainSignature>& linear_chain_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sparsevd::linear_chain", "")
                             .typed<LinearChainSignature>();
  return op;
}

// One layer, its tensors made contiguous. Dense: `weight` [N, K]. CSR: `weight` holds the
// values [nnz], `crow` [N + 1] and `col` [nnz] are int32. `bias` is undefined if absent.
struct ChainLayer {
  at::Tensor weight, crow, col, bias;
  bool sparse = false;
  int64_t N = 0, K = 0, nnz = 0;
  int64_t act = 0;
  double param = 0.0;
};

// Checks the arguments of linear_chain and returns its layers (linear_chain_checks.cpp).
std::vector<ChainLayer> linear_chain_layers(const at::Tensor& x, at::TensorList weights,
                                            const OptionalTensorList& crow_indices,
                                            const OptionalTensorList& col_indices,
                                            const OptionalTensorList& biases,
                                            at::IntArrayRef activations,
                                            at::ArrayRef<double> activation_params);

}  // namespace sparsevd
