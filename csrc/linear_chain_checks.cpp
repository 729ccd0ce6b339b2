// sparsevd::linear_chain's argument checks (linear_chain.h), for every device.
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "activations.h"
#include "linear_chain.h"

namespace sparsevd {

std::vector<ChainLayer> linear_chain_layers(const at::Tensor& x, at::TensorList weights,
                                            const OptionalTensorList& crow_indices,
                                            const OptionalTensorList& col_indices,
                                            const OptionalTensorList& biases,
                                            at::IntArrayRef activations,
                                            at::ArrayRef<double> activation_params) {
  constexpr const char* op = "sparsevd::linear_chain";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              op, ": x must be float32, float16, bfloat16 or float64, got ", dtype);
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1, op, ": needs at least one layer");
  TORCH_CHECK(static_cast<int64_t>(crow_indices.size()) == L &&
                  static_cast<int64_t>(col_indices.size()) == L &&
                  static_cast<int64_t>(biases.size()) == L &&
                  static_cast<int64_t>(activations.size()) == L &&
                  static_cast<int64_t>(activation_params.size()) == L,
              op, ": weights, crow_indices, col_indices, biases, activations and ",
              "activation_params must have one entry per layer, got ", L, ", ",
              crow_indices.size(), ", ", col_indices.size(), ", ", biases.size(), ", ",
              activations.size(), " and ", activation_params.size());
  const auto device = x.device();
  std::vector<ChainLayer> layers(L);
  int64_t K = x.size(1);
  for (int64_t i = 0; i < L; ++i) {
    ChainLayer& layer = layers[i];
    const at::Tensor& w = weights[i];
    const std::optional<at::Tensor> crow = crow_indices.get(i);
    const std::optional<at::Tensor> col = col_indices.get(i);
    const std::optional<at::Tensor> bias = biases.get(i);
    const bool has_crow = crow.has_value() && crow->defined();
    const bool has_col = col.has_value() && col->defined();
    TORCH_CHECK(has_crow == has_col, op, ": layer ", i,
                ": crow_indices and col_indices must both be given (CSR) or both be None (dense)");
    TORCH_CHECK(w.scalar_type() == dtype, op, ": layer ", i, ": weight has dtype ",
                w.scalar_type(), " but x has ", dtype);
    TORCH_CHECK(w.device() == device, op, ": layer ", i, ": weight is on ", w.device(),
                " but x is on ", device);
    layer.sparse = has_crow;
    layer.K = K;
    if (has_crow) {
      const at::Tensor& c = *crow;
      const at::Tensor& k = *col;
      TORCH_CHECK(c.dim() == 1 && c.numel() >= 1 && c.scalar_type() == at::kInt, op, ": layer ",
                  i, ": crow_indices must be a 1-D int32 tensor of N + 1 >= 1 entries, got ",
                  c.scalar_type(), " of shape ", c.sizes());
      TORCH_CHECK(k.dim() == 1 && k.scalar_type() == at::kInt, op, ": layer ", i,
                  ": col_indices must be a 1-D int32 tensor, got ", k.scalar_type(),
                  " of shape ", k.sizes());
      TORCH_CHECK(w.dim() == 1 && w.numel() == k.numel(), op, ": layer ", i,
                  ": a CSR layer's weight is its values, 1-D with one entry per column index (",
                  k.numel(), "), got shape ", w.sizes());
      TORCH_CHECK(k.numel() <= INT32_MAX, op, ": layer ", i, ": nnz must fit in int32, got ",
                  k.numel());
      TORCH_CHECK(c.device() == device && k.device() == device, op, ": layer ", i,
                  ": crow_indices and col_indices must be on x's device (", device, "), got ",
                  c.device(), " and ", k.device());
      layer.crow = c.contiguous();
      layer.col = k.contiguous();
      layer.N = c.numel() - 1;
      layer.nnz = k.numel();
      TORCH_CHECK(K > 0 || layer.nnz == 0, op, ": layer ", i, " has K = 0 inputs but ",
                  layer.nnz, " non-zeros");
    } else {
      TORCH_CHECK(w.dim() == 2 && w.size(1) == K, op, ": layer ", i,
                  ": a dense weight must be [N, K = ", K, "], got shape ", w.sizes());
      layer.N = w.size(0);
    }
    layer.weight = w.contiguous();
    if (bias.has_value() && bias->defined()) {
      const at::Tensor& b = *bias;
      TORCH_CHECK(b.dim() == 1 && b.size(0) == layer.N && b.scalar_type() == dtype &&
                      b.device() == device,
                  op, ": layer ", i, ": bias must be a 1-D ", dtype, " tensor of N = ", layer.N,
                  " entries on ", device, ", got ", b.scalar_type(), " of shape ", b.sizes(),
                  " on ", b.device());
      layer.bias = b.contiguous();
    }
    layer.act = activations[i];
    TORCH_CHECK(layer.act >= 0 && layer.act < kNumActs, op, ": layer ", i,
                ": activation code ", layer.act, " is not one of 0..", kNumActs - 1,
                " (sparsevd.reference.ACTIVATIONS)");
    layer.param = activation_params[i];
    K = layer.N;
  }
  return layers;
}

}  // namespace sparsevd
