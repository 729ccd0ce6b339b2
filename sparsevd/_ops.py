"""The ``torch.ops.sparsevd`` operators: declared once here, with their fake (meta)
implementations and autograd formulas.

Kernels register per dispatch key, so torch's dispatcher alone picks the one that runs:

- the reference math (:mod:`sparsevd.backends.default`) is every op's default kernel
  (CompositeExplicitAutograd), for any device;
- the C++ extension ``sparsevd._C`` registers CPU and CUDA kernels (``TORCH_LIBRARY_IMPL``
  in ``csrc/``), which take precedence on their device;
- Triton kernels register for CUDA (:mod:`sparsevd.backends.triton`) where no C++ one does.

The fakes make the ops work under ``torch.compile(fullgraph=True)``, ``torch.export`` and
``torch.library.opcheck``.
"""

from __future__ import annotations

import torch

LIBRARY = torch.library.Library("sparsevd", "DEF")

#: Every schema of the package. The comments are the ops' contracts.
SCHEMAS = {
    # Σ KL(q‖p) over all weights, a 0-dim float32 (float64 for float64 input).
    "kl_divergence": "kl_divergence(Tensor weight, Tensor log_sigma2, float log_alpha_min, "
                     "float log_alpha_max) -> Tensor",
    # (∂/∂weight, ∂/∂log_sigma2) of grad · kl_divergence, in the parameters' dtype.
    "kl_divergence_backward": "kl_divergence_backward(Tensor grad, Tensor weight, Tensor log_sigma2, "
                              "float log_alpha_min, float log_alpha_max) -> (Tensor, Tensor)",
    # (Σ KL, ∂KL/∂weight, ∂KL/∂log_sigma2) in one sweep: the forward of training, where the
    # gradients are kept for backward (which scales them by the incoming grad).
    "kl_divergence_with_grad": "kl_divergence_with_grad(Tensor weight, Tensor log_sigma2, float log_alpha_min, "
                               "float log_alpha_max) -> (Tensor, Tensor, Tensor)",
    # LRT linear on x [M, K]: returns (y, s), s = the [M, N] std kept for backward. The noise
    # comes from `seed` (int64, 0-dim) and is regenerated, never stored.
    "lrt_linear": "lrt_linear(Tensor x, Tensor weight, Tensor log_sigma2, Tensor? bias, Tensor seed) "
                  "-> (Tensor, Tensor)",
    # (∂x, ∂weight, ∂log_sigma2, ∂bias); entries not asked for in output_mask are empty.
    "lrt_linear_backward": "lrt_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor log_sigma2, "
                           "Tensor std, Tensor seed, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
    # The exact [M, N] float32 noise that lrt_linear(x, weight, ..., seed) used.
    "lrt_noise": "lrt_noise(Tensor x, Tensor weight, Tensor seed) -> Tensor",
    # The LRT's sampling step for any layer with Gaussian pre-activations (a conv, say):
    # (y, s) with s = sqrt(var + 1e-8), y = mean + s ⊙ z; z at the flat indices of the
    # contiguous mean, from `seed` (the same numbers lrt_linear uses for an [M, N] output).
    "lrt_sample": "lrt_sample(Tensor mean, Tensor var, Tensor seed) -> (Tensor, Tensor)",
    # h = grad ⊙ z / (2 std): the gradient w.r.t. var (the one w.r.t. mean is grad).
    "lrt_sample_backward": "lrt_sample_backward(Tensor grad, Tensor std, Tensor seed) -> Tensor",
    # The exact float32 noise, of mean's shape, that lrt_sample(mean, ..., seed) used.
    "lrt_sample_noise": "lrt_sample_noise(Tensor mean, Tensor seed) -> Tensor",
    # y = x W_csrᵀ + b, x [M, K], W [N, K] in CSR with int32 indices. row_order: an int32
    # permutation of the N rows, the order in which the GPU kernel schedules them (longest
    # first balances the load, as in Sputnik); it never changes the result. Every index
    # read is checked; the order of a row's columns is not (a valid structure:
    # reference.csr_structure_error): unsorted or repeated columns give W =
    # reference.csr_to_dense, repeated entries summed, on every device. Nor is it checked
    # that row_order is a permutation (reference.row_order_error; an O(N) pass): the
    # callers that validate the structure check it.
    "csr_linear": "csr_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
                  "Tensor? bias, Tensor? row_order=None) -> Tensor",
    # A chain of linear layers with elementwise activations, as one op (a sparsified MLP):
    # x [M, K0]; layer i is dense (crow_indices[i] None, weights[i] [N_i, K_i]) or CSR
    # (weights[i] the values [nnz_i], int32 crow [N_i + 1] and col [nnz_i]); K_i = N_{i-1};
    # then activation code activations[i] (sparsevd.reference.ACTIVATIONS) with parameter
    # activation_params[i]. Inference only: it has no gradient.
    "linear_chain": "linear_chain(Tensor x, Tensor[] weights, Tensor?[] crow_indices, Tensor?[] col_indices, "
                    "Tensor?[] biases, int[] activations, float[] activation_params) -> Tensor",
    # Structured Bayesian Pruning, per unit log θ ~ N(mu, exp(log_sigma)²) truncated to [a, b]
    # (sparsevd.reference, SBP section). (Σ KL over the units, ∂KL/∂mu, ∂KL/∂log_sigma): the
    # sum float32 (float64 for float64 mu), the gradients in the parameters' dtype.
    "sbp_kl": "sbp_kl(Tensor mu, Tensor log_sigma, float a, float b) -> (Tensor, Tensor, Tensor)",
    # θ [batch, units], one per example and unit, at the uniforms sbp_noise draws from `seed`;
    # with with_grad also ∂θ/∂mu and ∂θ/∂log_sigma per element, kept for backward (else empty,
    # and backward regenerates them). float32 (float64 for float64 mu).
    "sbp_sample": "sbp_sample(Tensor mu, Tensor log_sigma, Tensor seed, int batch, float a, float b, "
                  "bool with_grad) -> (Tensor, Tensor, Tensor)",
    # The float32 uniforms [batch, units] that sbp_sample(mu, ..., seed, batch, ...) used.
    "sbp_noise": "sbp_noise(Tensor mu, Tensor seed, int batch) -> Tensor",
}

for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)

# The noise is a constant of the seed: nothing to differentiate, whatever requires grad.
for _name in ("lrt_noise", "lrt_sample_noise", "sbp_noise"):
    LIBRARY.impl(_name, torch.library.fallthrough_kernel, "Autograd")

ops = torch.ops.sparsevd


def _kl_dtype(weight):
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


@torch.library.register_fake("sparsevd::kl_divergence")
def _(weight, log_sigma2, log_alpha_min, log_alpha_max):
    return weight.new_empty((), dtype=_kl_dtype(weight))


@torch.library.register_fake("sparsevd::kl_divergence_backward")
def _(grad, weight, log_sigma2, log_alpha_min, log_alpha_max):
    return torch.empty_like(weight), torch.empty_like(log_sigma2)


def _kl_setup(ctx, inputs, output):
    weight, log_sigma2, lo, hi = inputs
    ctx.save_for_backward(weight, log_sigma2)
    ctx.log_alpha_range = (lo, hi)


def _kl_backward(ctx, grad):
    weight, log_sigma2 = ctx.saved_tensors
    dw, ds = ops.kl_divergence_backward(grad, weight, log_sigma2, *ctx.log_alpha_range)
    return dw, ds, None, None


torch.library.register_autograd("sparsevd::kl_divergence", _kl_backward, setup_context=_kl_setup)


@torch.library.register_fake("sparsevd::kl_divergence_with_grad")
def _(weight, log_sigma2, log_alpha_min, log_alpha_max):
    # Every kernel returns contiguous gradients, whatever the parameters' strides.
    kl = weight.new_empty((), dtype=_kl_dtype(weight))
    return kl, weight.new_empty(weight.shape), log_sigma2.new_empty(log_sigma2.shape)


def _kl_with_grad_setup(ctx, inputs, output):
    weight, log_sigma2, lo, hi = inputs
    _, dw, ds = output
    ctx.mark_non_differentiable(dw, ds)
    ctx.set_materialize_grads(False)  # no zero tensors for the two gradient outputs
    # ∂KL for grad = 1 came out of the forward sweep; the first backward scales it in place
    # (no second pair of parameter-sized buffers, which page-faults on big layers). They are
    # held on ctx rather than saved, so that scaling does not trip the saved-tensor version
    # check; a second backward through a retained graph recomputes from the parameters.
    ctx.unit_grads = (dw, ds)
    ctx.log_alpha_range = (lo, hi)
    ctx.save_for_backward(weight, log_sigma2)


def _kl_with_grad_backward(ctx, grad, _grad_dw, _grad_ds):
    if grad is None:  # grads are not materialized: None means zero
        return None, None, None, None
    if ctx.unit_grads is not None:
        dw, ds = ctx.unit_grads
        ctx.unit_grads = None
        if type(dw) is torch.Tensor and type(grad) is torch.Tensor and not torch.compiler.is_compiling():
            return dw.mul_(grad), ds.mul_(grad), None, None
        return dw * grad, ds * grad, None, None  # traced (fake / functional tensors): no mutation
    weight, log_sigma2 = ctx.saved_tensors
    dw, ds = ops.kl_divergence_backward(grad, weight, log_sigma2, *ctx.log_alpha_range)
    return dw, ds, None, None


torch.library.register_autograd(
    "sparsevd::kl_divergence_with_grad", _kl_with_grad_backward, setup_context=_kl_with_grad_setup
)


@torch.library.register_fake("sparsevd::lrt_linear")
def _(x, weight, log_sigma2, bias, seed):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.register_fake("sparsevd::lrt_linear_backward")
def _(grad, x, weight, log_sigma2, std, seed, output_mask):
    like = (x, weight, log_sigma2, grad.new_empty(grad.shape[1]))
    return tuple(torch.empty_like(t) if need else grad.new_empty(0) for t, need in zip(like, output_mask))


@torch.library.register_fake("sparsevd::lrt_noise")
def _(x, weight, seed):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def _lrt_setup(ctx, inputs, output):
    x, weight, log_sigma2, bias, seed = inputs
    _, std = output
    ctx.mark_non_differentiable(std)
    ctx.has_bias = bias is not None
    # Saved: x, the parameters and one [M, N] tensor; the noise is regenerated.
    ctx.save_for_backward(x, weight, log_sigma2, std, seed)


def _lrt_backward(ctx, grad, _grad_std):
    x, weight, log_sigma2, std, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], ctx.has_bias and need[3]]
    dx, dw, ds, db = ops.lrt_linear_backward(grad.contiguous(), x, weight, log_sigma2, std, seed, mask)
    return (dx if mask[0] else None, dw if mask[1] else None, ds if mask[2] else None, db if mask[3] else None, None)


torch.library.register_autograd("sparsevd::lrt_linear", _lrt_backward, setup_context=_lrt_setup)


@torch.library.register_fake("sparsevd::lrt_sample")
def _(mean, var, seed):
    like = dict(memory_format=torch.contiguous_format)
    return torch.empty_like(mean, **like), torch.empty_like(mean, **like)


@torch.library.register_fake("sparsevd::lrt_sample_backward")
def _(grad, std, seed):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake("sparsevd::lrt_sample_noise")
def _(mean, seed):
    return mean.new_empty(mean.shape, dtype=torch.float32)


def _sample_setup(ctx, inputs, output):
    _, _, seed = inputs
    _, std = output
    ctx.mark_non_differentiable(std)
    ctx.save_for_backward(std, seed)  # the noise is regenerated from the seed


def _sample_backward(ctx, grad, _grad_std):
    std, seed = ctx.saved_tensors
    dvar = ops.lrt_sample_backward(grad.contiguous(), std, seed) if ctx.needs_input_grad[1] else None
    return grad if ctx.needs_input_grad[0] else None, dvar, None


torch.library.register_autograd("sparsevd::lrt_sample", _sample_backward, setup_context=_sample_setup)


def _on_one_device(op, x, *tensors):
    """The fakes also run for real meta tensors: an input on the meta device beside a layer
    on the CPU must be refused as the device kernels refuse it, not given a meta result."""
    for t in tensors:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"sparsevd::{op}: expected every tensor on the input's device {x.device}, got one on "
                               f"{t.device}")


@torch.library.register_fake("sparsevd::csr_linear")
def _(x, crow_indices, col_indices, values, bias, row_order=None):
    _on_one_device("csr_linear", x, crow_indices, col_indices, values, bias, row_order)
    return x.new_empty((x.shape[0], crow_indices.shape[0] - 1))


def _csr_setup(ctx, inputs, output):
    x, crow_indices, col_indices, values, bias, _row_order = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, crow_indices, col_indices, values)


def _csr_backward(ctx, grad):
    # Training through a CSR layer is rare (fine-tuning the surviving weights): dense
    # formulas are simple and correct, speed is the forward's business.
    from .reference import csr_to_dense

    x, crow_indices, col_indices, values = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = grad @ csr_to_dense(crow_indices, col_indices, values, x.shape[1]) if need[0] else None
    dvalues = None
    if need[3]:
        counts = (crow_indices[1:] - crow_indices[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(grad.shape[1], device=grad.device), counts)
        dvalues = (grad.t() @ x)[rows, col_indices.long()]
    db = grad.sum(0) if ctx.has_bias and need[4] else None
    return dx, None, None, dvalues, db, None


torch.library.register_autograd("sparsevd::csr_linear", _csr_backward, setup_context=_csr_setup)


@torch.library.register_fake("sparsevd::linear_chain")
def _(x, weights, crow_indices, col_indices, biases, activations, activation_params):
    _on_one_device("linear_chain", x, *weights, *crow_indices, *col_indices, *biases)
    last = weights[-1].shape[0] if crow_indices[-1] is None else crow_indices[-1].shape[0] - 1
    return x.new_empty((x.shape[0], last))


def _chain_setup(ctx, inputs, output):
    pass


def _chain_backward(ctx, grad):
    raise RuntimeError("sparsevd::linear_chain is inference-only (it has no gradient): run the layers one by one "
                       "(sparsevd.FusedSequential does when autograd needs it) or fine-tune the SparseVD model")


# The compiled extension registers a C++ autograd kernel that refuses before the forward;
# this one serves the other backends.
torch.library.register_autograd("sparsevd::linear_chain", _chain_backward, setup_context=_chain_setup)


def _sbp_dtype(mu):
    return torch.float64 if mu.dtype == torch.float64 else torch.float32


@torch.library.register_fake("sparsevd::sbp_kl")
def _(mu, log_sigma, a, b):
    return mu.new_empty((), dtype=_sbp_dtype(mu)), mu.new_empty(mu.shape), log_sigma.new_empty(log_sigma.shape)


def _sbp_kl_setup(ctx, inputs, output):
    _, dmu, dls = output
    ctx.mark_non_differentiable(dmu, dls)
    # The per-unit gradients come out of the forward sweep ([units]-sized: keeping them
    # costs nothing, recomputing them costs a second sweep of special functions).
    ctx.save_for_backward(dmu, dls)


def _sbp_kl_backward(ctx, grad, _grad_dmu, _grad_dls):
    dmu, dls = ctx.saved_tensors
    return dmu * grad.to(dmu.dtype), dls * grad.to(dls.dtype), None, None


torch.library.register_autograd("sparsevd::sbp_kl", _sbp_kl_backward, setup_context=_sbp_kl_setup)


@torch.library.register_fake("sparsevd::sbp_sample")
def _(mu, log_sigma, seed, batch, a, b, with_grad):
    theta = mu.new_empty((batch, mu.shape[0]), dtype=_sbp_dtype(mu))
    grads = (batch, mu.shape[0]) if with_grad else (0,)
    return theta, theta.new_empty(grads), theta.new_empty(grads)


@torch.library.register_fake("sparsevd::sbp_noise")
def _(mu, seed, batch):
    return mu.new_empty((batch, mu.shape[0]), dtype=torch.float32)


def _sbp_sample_setup(ctx, inputs, output):
    mu, log_sigma, seed, batch, a, b, with_grad = inputs
    _, dmu, dls = output
    ctx.mark_non_differentiable(dmu, dls)
    # With with_grad, ∂θ/∂μ and ∂θ/∂log σ per element come out of the forward and are kept:
    # the backward is then two multiply-sums. Without, the backward regenerates them from
    # the seed (bench/results/2026-11-30-cpu-sbp.md measures both).
    ctx.with_grad = with_grad
    ctx.args = (batch, a, b)
    ctx.save_for_backward(dmu, dls, mu, log_sigma, seed)


def _sbp_sample_backward(ctx, grad, _grad_dmu, _grad_dls):
    dmu, dls, mu, log_sigma, seed = ctx.saved_tensors
    if not ctx.with_grad:
        _, dmu, dls = ops.sbp_sample(mu, log_sigma, seed, *ctx.args, True)
    g = grad.to(dmu.dtype)
    return (g * dmu).sum(0).to(mu.dtype), (g * dls).sum(0).to(log_sigma.dtype), None, None, None, None, None


torch.library.register_autograd("sparsevd::sbp_sample", _sbp_sample_backward, setup_context=_sbp_sample_setup)
