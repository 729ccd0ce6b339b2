// The Python module of the extension, `sparsevd._C`. Importing it loads the shared
// library, whose static initialisers register every kernel for its dispatch key
// (TORCH_LIBRARY_IMPL in each kernel's file; the dispatcher accepts an implementation
// before or after its schema, which is declared in Python, sparsevd/_ops.py).
//
// The module itself holds two helpers. activation_codes() returns linear_chain's
// activation table (csrc/activations.h) as {name: code}, for Python to check its own
// against. BoundChain: a linear chain's arguments bound once,
// for eager calls. linear_chain takes four lists of tensors, which torch's Python binding
// converts element by element on every call (about 5 µs, more than a batch-1 call of a
// pruned LeNet computes). A bound chain is called with the input alone and calls the same
// op through the dispatcher, so the device kernel and the autograd kernel are the op's own;
// it also does the input's reshaping (a leading Flatten, or extra leading dimensions),
// which costs a microsecond from Python.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "activations.h"
#include "linear_chain.h"

namespace sparsevd {
namespace {

using OptionalTensors = std::vector<std::optional<at::Tensor>>;

OptionalTensorList to_list(const OptionalTensors& tensors) {
  OptionalTensorList list;
  list.reserve(tensors.size());
  for (const auto& t : tensors) list.push_back(t);
  return list;
}

class BoundChain {
 public:
  // flatten: the chain starts with Flatten(1, -1) (x [M, ...] is read as [M, K0]); else x
  // is [*, K0] and the output [*, N]. `name` is the first layer's, for the error message.
  BoundChain(std::vector<at::Tensor> weights, const OptionalTensors& crow_indices,
             const OptionalTensors& col_indices, const OptionalTensors& biases,
             std::vector<int64_t> activations, std::vector<double> activation_params,
             int64_t in_features, bool flatten, std::string name)
      : in_features_(in_features),
        flatten_(flatten),
        name_(std::move(name)),
        weights_(std::move(weights)),
        crow_indices_(to_list(crow_indices)),
        col_indices_(to_list(col_indices)),
        biases_(to_list(biases)),
        activations_(std::move(activations)),
        activation_params_(std::move(activation_params)) {
    for (const auto* list : {&crow_indices, &col_indices})
      for (const auto& t : *list)
        if (t.has_value()) indices_.emplace_back(*t, t->_version());
  }

  // Whether the index tensors were edited in place since binding: their owner must check
  // them again (and bind again) before the kernels read them.
  bool stale() const {
    for (const auto& [t, version] : indices_)
      if (t._version() != version) return true;
    return false;
  }

  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor flat = x;
    if (flatten_) {
      TORCH_CHECK_VALUE(x.dim() >= 2, "Flatten(1, -1) before ", name_, " needs an input with a batch ",
                        "dimension, got shape ", x.sizes());
      if (x.dim() != 2) flat = x.reshape({x.size(0), -1});
    } else if (x.dim() != 2) {
      TORCH_CHECK_VALUE(x.dim() >= 1, name_, ": expected input of shape [*, ", in_features_,
                        "], got shape ", x.sizes());
      flat = x.reshape({-1, x.size(-1)});
    }
    TORCH_CHECK_VALUE(flat.size(1) == in_features_, name_, ": expected input of shape [*, ",
                      in_features_, "], got shape ", flat.sizes());
    at::Tensor y = call_op(flat);
    if (flatten_ || x.dim() == 2) return y;
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = y.size(1);
    return y.reshape(sizes);
  }

 private:
  at::Tensor call_op(const at::Tensor& x) const {
    const auto& op = linear_chain_op();
    if (!at::GradMode::is_enabled()) {
      // what the op's autograd kernel would do without a graph to record: go below it
      at::AutoDispatchBelowADInplaceOrView guard;
      return op.call(x, weights_, crow_indices_, col_indices_, biases_, activations_,
                     activation_params_);
    }
    return op.call(x, weights_, crow_indices_, col_indices_, biases_, activations_,
                   activation_params_);
  }

  int64_t in_features_;
  bool flatten_;
  std::string name_;
  std::vector<at::Tensor> weights_;
  OptionalTensorList crow_indices_, col_indices_, biases_;
  std::vector<int64_t> activations_;
  std::vector<double> activation_params_;
  std::vector<std::pair<at::Tensor, int64_t>> indices_;
};

pybind11::dict activation_codes() {
  pybind11::dict codes;
#define SPARSEVD_ACT_CODE(NAME, PY_NAME, SCALAR, ATEN_INPLACE) codes[PY_NAME] = static_cast<int64_t>(NAME);
  SPARSEVD_ACTIVATIONS(SPARSEVD_ACT_CODE)
#undef SPARSEVD_ACT_CODE
  return codes;
}

}  // namespace
}  // namespace sparsevd

PYBIND11_MODULE(_C, m) {
  m.def("activation_codes", &sparsevd::activation_codes);
  pybind11::class_<sparsevd::BoundChain>(m, "BoundChain")
      .def(pybind11::init<std::vector<at::Tensor>, const sparsevd::OptionalTensors&,
                          const sparsevd::OptionalTensors&, const sparsevd::OptionalTensors&,
                          std::vector<int64_t>, std::vector<double>, int64_t, bool, std::string>())
      .def("__call__", &sparsevd::BoundChain::operator(), pybind11::arg("x"))
      .def("stale", &sparsevd::BoundChain::stale);
}
