// CUDA kernel of sparsevd::linear_chain, composed in C++: per layer the CSR SpMM of
// csr_linear (csr_spmm.cu) with the bias fused, or an ATen GEMM (cuBLAS) for a dense
// layer, then the activation as an in-place ATen op. Activations are rounded to the
// dtype between layers, as the layers one by one would be. One dispatch for the whole
// chain, no synchronization (a fixed-shape call can be captured in a CUDA graph).
// Invalid CSR structure gives the affected rows NaN outputs (csr_spmm.h) instead of an
// error, and the NaN runs on through the later layers. Rows are scheduled in their
// natural order (no row_order per layer).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../activations.h"
#include "../linear_chain.h"
#include "csr_linear.h"

namespace sparsevd {

namespace {

void activate_(at::Tensor& h, int64_t act, double p) {
  switch (act) {
#define SPARSEVD_ACT_ATEN(NAME, PY_NAME, SCALAR, ATEN_INPLACE) \
  case NAME:                                                  \
    ATEN_INPLACE;                                             \
    break;
    SPARSEVD_ACTIVATIONS(SPARSEVD_ACT_ATEN)
#undef SPARSEVD_ACT_ATEN
  }
}

at::Tensor linear_chain_cuda(const at::Tensor& x, at::TensorList weights,
                             const OptionalTensorList& crow_indices,
                             const OptionalTensorList& col_indices, const OptionalTensorList& biases,
                             at::IntArrayRef activations, at::ArrayRef<double> activation_params) {
  const std::vector<ChainLayer> layers = linear_chain_layers(
      x, weights, crow_indices, col_indices, biases, activations, activation_params);
  TORCH_CHECK(x.is_cuda(), "sparsevd::linear_chain: the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h = x;
  for (const ChainLayer& l : layers) {
    if (l.sparse) {
      h = csr_linear_cuda_run(h, l.crow, l.col, l.weight, l.bias, at::Tensor());
    } else {
      h = l.bias.defined() ? at::addmm(l.bias, h, l.weight.t()) : at::mm(h, l.weight.t());
    }
    activate_(h, l.act, l.param);
  }
  return h.contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsevd, CUDA, m) { m.impl("linear_chain", &linear_chain_cuda); }

}  // namespace sparsevd
