// The operator schemas of sparsevd, declared once. Kernels are registered per
// device in csrc/cpu, csrc/cuda (C++) and sparsevd/dispatch.py (Python, Triton);
// fake implementations and autograd formulas live in sparsevd/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(sparsevd, m) {
  // Σ KL(q‖p) over all weights, a 0-dim float32 (float64 for float64 input).
  m.def("kl_divergence(Tensor weight, Tensor log_sigma2, float log_alpha_min, "
        "float log_alpha_max) -> Tensor");
  // (∂/∂weight, ∂/∂log_sigma2) of grad · kl_divergence, in the parameters' dtype.
  m.def("kl_divergence_backward(Tensor grad, Tensor weight, Tensor log_sigma2, "
        "float log_alpha_min, float log_alpha_max) -> (Tensor, Tensor)");
  // (Σ KL, ∂KL/∂weight, ∂KL/∂log_sigma2) in one sweep: the forward of training, where
  // the gradients are kept for backward (which scales them by the incoming grad).
  m.def("kl_divergence_with_grad(Tensor weight, Tensor log_sigma2, float log_alpha_min, "
        "float log_alpha_max) -> (Tensor, Tensor, Tensor)");
  // LRT linear on x [M, K]: returns (y, s), s = the [M, N] std kept for backward.
  // The noise comes from `seed` (int64, 0-dim) and is regenerated, never stored.
  m.def("lrt_linear(Tensor x, Tensor weight, Tensor log_sigma2, Tensor? bias, "
        "Tensor seed) -> (Tensor, Tensor)");
  // (∂x, ∂weight, ∂log_sigma2, ∂bias); entries not asked for in output_mask are empty.
  m.def("lrt_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor log_sigma2, "
        "Tensor std, Tensor seed, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // The exact [M, N] float32 noise that lrt_linear(x, weight, ..., seed) used.
  m.def("lrt_noise(Tensor x, Tensor weight, Tensor seed) -> Tensor");
  // The LRT's sampling step for any layer with Gaussian pre-activations (a conv, say):
  // (y, s) with s = sqrt(var + 1e-8), y = mean + s ⊙ z; z at the flat indices of the
  // contiguous mean, from `seed` (the same numbers lrt_linear uses for an [M, N] output).
  m.def("lrt_sample(Tensor mean, Tensor var, Tensor seed) -> (Tensor, Tensor)");
  // h = grad ⊙ z / (2 std): the gradient w.r.t. var (the one w.r.t. mean is grad).
  m.def("lrt_sample_backward(Tensor grad, Tensor std, Tensor seed) -> Tensor");
  // The exact float32 noise, of mean's shape, that lrt_sample(mean, ..., seed) used.
  m.def("lrt_sample_noise(Tensor mean, Tensor seed) -> Tensor");
  // y = x W_csrᵀ + b, x [M, K], W [N, K] in CSR with int32 indices. row_order: an int32
  // permutation of the N rows, the order in which the GPU kernel schedules them (longest
  // first balances the load, as in Sputnik); it never changes the result. No index is
  // trusted: the CPU kernel raises on an invalid structure (RuntimeError for
  // crow_indices, IndexError for a column outside [0, K)); the CUDA kernel, which cannot
  // raise without a sync, makes every output of an invalid row NaN (entries of row_order
  // outside [0, N) are skipped). Neither reads or writes out of bounds.
  m.def("csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
        "Tensor? bias, Tensor? row_order=None) -> Tensor");
  // A chain of linear layers, each followed by an elementwise activation, in one call
  // (inference only): x [M, K0] -> [M, N_last]. Layer i is dense when crow_indices[i]
  // is None (weights[i] = [N_i, K_i]) or CSR (weights[i] = values [nnz_i], int32
  // crow_indices[i] [N_i + 1] and col_indices[i] [nnz_i]); K_i = N_(i-1); biases[i]
  // may be None. activations[i] is an index into sparsevd.reference.ACTIVATIONS (0
  // identity, 1 relu, 2 leaky_relu, 3 relu6, 4 elu, 5 tanh, 6 sigmoid, 7 gelu,
  // 8 gelu_tanh, 9 silu); activation_params[i] is leaky_relu's slope or elu's alpha.
  m.def("linear_chain(Tensor x, Tensor[] weights, Tensor?[] crow_indices, "
        "Tensor?[] col_indices, Tensor?[] biases, int[] activations, "
        "float[] activation_params) -> Tensor");
}

// The noise is a constant of the seed: nothing to differentiate.
TORCH_LIBRARY_IMPL(sparsevd, Autograd, m) {
  m.impl("lrt_noise", torch::CppFunction::makeFallthrough());
  m.impl("lrt_sample_noise", torch::CppFunction::makeFallthrough());
}

// `import sparsevd._C` loads the library above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
