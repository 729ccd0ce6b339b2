// The autograd kernels of sparsevd::csr_linear and sparsevd::linear_chain, for the
// AutogradCPU and AutogradCUDA keys (they take precedence over the Python formulas that
// torch.library.register_autograd puts on the Autograd alias in sparsevd/_ops.py, which
// serve the devices without C++ kernels).
//
// csr_linear: the Python formula's wrapper runs on every call, even under no_grad (a few
// microseconds, as much as the batch-1 kernel itself). Here a call that needs no graph
// goes straight to the backend kernel; one that does runs a torch::autograd::Function
// whose backward gives what the Python one gives:
//   ∂x = g · W (W densified as reference.csr_to_dense does, repeated entries summed:
//   training through a CSR layer is rare, and dense formulas are simple),
//   ∂values_j = Σ_m g[m, row_j] · x[m, col_j], ∂bias = Σ_m g[m, :].
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "linear_chain.h"

namespace sparsevd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor csr_linear_below_autograd(const at::Tensor& x, const at::Tensor& crow,
                                     const at::Tensor& col, const at::Tensor& values,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& row_order) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparsevd::csr_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, crow, col, values, bias, row_order);
}

// The row of every non-zero (int64 [nnz]). Sizes are symbolic and the output length is
// given, so that torch.compile traces this with fake tensors (no data).
at::Tensor rows_of_nonzeros(const at::Tensor& crow, const c10::SymInt& nnz) {
  const at::Tensor counts = at::diff(crow).to(at::kLong);
  const at::Tensor rows = at::arange(c10::Scalar(crow.sym_size(0) - 1), counts.options());
  return at::repeat_interleave_symint(rows, counts, 0, nnz);
}

class CsrLinearFunction : public torch::autograd::Function<CsrLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& crow,
                            const at::Tensor& col, const at::Tensor& values,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& row_order) {
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, crow, col, values});
    return csr_linear_below_autograd(x, crow, col, values, bias, row_order);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &crow = saved[1], &col = saved[2], &values = saved[3];
    const at::Tensor& g = grads[0];
    at::Tensor dx, dvalues, dbias;
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(3)) {
      const at::Tensor rows = rows_of_nonzeros(crow, col.sym_numel());
      const at::Tensor cols = col.to(at::kLong);
      if (ctx->needs_input_grad(0)) {
        const at::Tensor dense =
            at::zeros_symint({crow.sym_size(0) - 1, x.sym_size(1)}, values.options())
                .index_put({rows, cols}, values, /*accumulate=*/true);
        dx = g.mm(dense);
      }
      if (ctx->needs_input_grad(3)) dvalues = g.t().mm(x).index({rows, cols});
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(4)) dbias = g.sum(0);
    return {dx, at::Tensor(), at::Tensor(), dvalues, dbias, at::Tensor()};
  }
};

at::Tensor csr_linear_autograd(const at::Tensor& x, const at::Tensor& crow_indices,
                               const at::Tensor& col_indices, const at::Tensor& values,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& row_order) {
  const bool needs_graph =
      at::GradMode::is_enabled() &&
      (x.requires_grad() || values.requires_grad() ||
       (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!needs_graph)
    return csr_linear_below_autograd(x, crow_indices, col_indices, values, bias, row_order);
  return CsrLinearFunction::apply(x, crow_indices, col_indices, values, bias, row_order);
}

// linear_chain is inference only: this refuses to run where autograd would need a graph,
// and otherwise runs the backend kernel below autograd.
at::Tensor linear_chain_autograd(const at::Tensor& x, at::TensorList weights,
                                 const OptionalTensorList& crow_indices,
                                 const OptionalTensorList& col_indices,
                                 const OptionalTensorList& biases, at::IntArrayRef activations,
                                 at::ArrayRef<double> activation_params) {
  if (at::GradMode::is_enabled()) {
    bool needs_grad = x.requires_grad();
    for (const auto& w : weights) needs_grad = needs_grad || w.requires_grad();
    for (size_t i = 0; i < biases.size(); ++i) {
      const std::optional<at::Tensor> b = biases.get(i);
      needs_grad = needs_grad || (b.has_value() && b->defined() && b->requires_grad());
    }
    TORCH_CHECK(!needs_grad,
                "sparsevd::linear_chain is inference-only (it has no backward), but grad mode "
                "is on and an input requires grad: run it under torch.no_grad() or "
                "torch.inference_mode(), or run the layers one by one to train through them");
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return linear_chain_op().call(x, weights, crow_indices, col_indices, biases, activations, activation_params);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsevd, AutogradCPU, m) {
  m.impl("csr_linear", &csr_linear_autograd);
  m.impl("linear_chain", &linear_chain_autograd);
}
TORCH_LIBRARY_IMPL(sparsevd, AutogradCUDA, m) {
  m.impl("csr_linear", &csr_linear_autograd);
  m.impl("linear_chain", &linear_chain_autograd);
}

}  // namespace sparsevd
