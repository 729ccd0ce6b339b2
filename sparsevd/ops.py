"""Fake (meta) implementations and autograd formulas of the ``torch.ops.sparsevd`` ops.

The schemas are declared in csrc/ops.cpp; the kernels per device are chosen in
:mod:`sparsevd.dispatch`. Registering fakes and autograd here makes the ops work under
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch

from . import dispatch

if dispatch.HAS_EXTENSION:
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
        # ∂KL for grad = 1 came out of the forward sweep; the first backward scales it in
        # place (no second pair of parameter-sized buffers, which page-faults on big
        # layers). They are held on ctx rather than saved, so that scaling does not trip
        # the saved-tensor version check; a second backward through a retained graph
        # recomputes from the parameters.
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
        return tuple(
            torch.empty_like(t) if need else grad.new_empty(0) for t, need in zip(like, output_mask)
        )

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
        return (
            dx if mask[0] else None,
            dw if mask[1] else None,
            ds if mask[2] else None,
            db if mask[3] else None,
            None,
        )

    torch.library.register_autograd("sparsevd::lrt_linear", _lrt_backward, setup_context=_lrt_setup)

    @torch.library.register_fake("sparsevd::lrt_sample")
    def _(mean, var, seed):
        return torch.empty_like(mean, memory_format=torch.contiguous_format), torch.empty_like(
            mean, memory_format=torch.contiguous_format
        )

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

    @torch.library.register_fake("sparsevd::csr_linear")
    def _(x, crow_indices, col_indices, values, bias, row_order=None):
        return x.new_empty((x.shape[0], crow_indices.shape[0] - 1))

    def _csr_setup(ctx, inputs, output):
        x, crow_indices, col_indices, values, bias, _row_order = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, crow_indices, col_indices, values)

    def _csr_backward(ctx, grad):
        # Training through a CSR layer is rare (fine-tuning the surviving weights):
        # dense formulas are simple and correct, speed is the forward's business.
        x, crow_indices, col_indices, values = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = None
        if need[0]:
            from .reference import csr_to_dense

            dx = grad @ csr_to_dense(crow_indices, col_indices, values, x.shape[1])
        dvalues = None
        if need[3]:
            rows = torch.repeat_interleave(
                torch.arange(grad.shape[1], device=grad.device), (crow_indices[1:] - crow_indices[:-1]).long()
            )
            dvalues = (grad.t() @ x)[rows, col_indices.long()]
        db = grad.sum(0) if ctx.has_bias and need[4] else None
        return dx, None, None, dvalues, db, None

    torch.library.register_autograd("sparsevd::csr_linear", _csr_backward, setup_context=_csr_setup)

    @torch.library.register_fake("sparsevd::linear_chain")
    def _(x, weights, crow_indices, col_indices, biases, activations, activation_params):
        last = weights[-1].shape[0] if crow_indices[-1] is None else crow_indices[-1].shape[0] - 1
        return x.new_empty((x.shape[0], last))
