"""sparsify(model): turn a trained SparseVD model into the fastest correct inference model.

Each SparseVD layer becomes its masked weight in the form a cost model predicts to be
fastest for the given batch size and device: CSR (:class:`SparseLinear`) or a dense
``nn.Linear``. Before that, dead units are cut: output units whose weights are all
pruned (their output is a constant, folded into the next layer's bias) and units whose
outputs no later layer reads, shrinking the neighbouring layers of a Sequential.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .layers import SparseVDLinear
from .sparse import SparseLinear

#: Modules that act on each feature separately (in eval mode), so a unit can be cut
#: through them and a constant unit stays a constant.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Identity, nn.Dropout,
)


@dataclass(frozen=True)
class DeviceCost:
    """time ≈ overhead + max(bytes / bandwidth, flops / rate), one line per form."""

    dense_overhead_s: float
    dense_bandwidth: float  # bytes/s streaming the dense weight
    dense_rate_fp32: float  # flop/s of a strict-fp32 GEMM
    dense_rate_fast: float  # flop/s of a 16-bit (or TF32) GEMM
    csr_overhead_s: float
    csr_bandwidth: float  # bytes/s streaming values + indices
    csr_rate: float  # useful flop/s of the SpMM


# Fitted to 4096x4096 at 98% sparsity, batch 1-4096 (the cases that decide the choice):
# CPU: this project's 2-core AMD EPYC CI machine, 2 threads; GPU: H100 80GB, torch 2.11.
# Both sets of measurements are in bench/results/.
CPU_COST = DeviceCost(3e-6, 21e9, 150e9, 150e9, 4e-6, 30e9, 42e9)
CUDA_COST = DeviceCost(6e-6, 2.4e12, 50e12, 420e12, 3e-6, 0.8e12, 3.5e12)


@dataclass(frozen=True)
class CostModel:
    """Predicts dense vs CSR time of a linear layer on a device type; pass your own
    :class:`DeviceCost` values to ``sparsify`` for other machines."""

    cpu: DeviceCost = CPU_COST
    cuda: DeviceCost = CUDA_COST

    def time(self, form, out_features, in_features, nnz, batch, device_type, element_size=4):
        c = self.cuda if device_type == "cuda" else self.cpu
        if form == "dense":
            size = out_features * in_features
            fast = element_size < 4 or (device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
            rate = c.dense_rate_fast if fast else c.dense_rate_fp32
            return c.dense_overhead_s + max(size * element_size / c.dense_bandwidth, 2 * size * batch / rate)
        return c.csr_overhead_s + max(nnz * (element_size + 4) / c.csr_bandwidth, 2 * nnz * batch / c.csr_rate)

    def choose(self, out_features, in_features, nnz, batch, device_type, element_size=4):
        args = (out_features, in_features, nnz, batch, device_type, element_size)
        return "csr" if self.time("csr", *args) < self.time("dense", *args) else "dense"


def _masked_dense(layer):
    """An nn.Linear holding θ ⊙ mask of a SparseVD layer (an exact eval-mode copy)."""
    with torch.no_grad():
        return _linear(layer.weight * layer.mask(), layer.bias, origin=True)


def _replace_sparsevd(module):
    for name, child in module.named_children():
        if isinstance(child, SparseVDLinear):
            setattr(module, name, _masked_dense(child))
        else:
            _replace_sparsevd(child)


def _linear(weight, bias, origin):
    # skip_init: the weights are overwritten at once, so don't draw random ones first
    layer = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.sparsevd_origin = origin
    return layer


def _shrink_pair(seq, i, j):
    """Cut the dead units between Linear seq[i] and Linear seq[j] (elementwise modules
    between them). Returns True if anything was cut."""
    a, b = seq[i], seq[j]
    wa, wb = a.weight.detach(), b.weight.detach()
    ba = a.bias.detach() if a.bias is not None else torch.zeros(wa.shape[0], dtype=wa.dtype, device=wa.device)
    dead = (wa == 0).all(1)  # constant outputs: act(bias)
    unused = (wb == 0).all(0)  # nothing downstream reads them
    cut = dead | unused
    if not bool(cut.any()):
        return False
    keep = ~cut
    new_b_bias = b.bias.detach().clone() if b.bias is not None else None
    fold = dead & ~unused
    if bool(fold.any()):
        constant = ba.clone()
        with torch.no_grad():
            for k in range(i + 1, j):
                constant = seq[k](constant)
        shift = wb[:, fold] @ constant[fold]
        new_b_bias = shift if new_b_bias is None else new_b_bias + shift
    seq[i] = _linear(wa[keep], None if a.bias is None else ba[keep], getattr(a, "sparsevd_origin", False))
    seq[j] = _linear(wb[:, keep], new_b_bias, getattr(b, "sparsevd_origin", False))
    return True


def _shrink_sequentials(module):
    for child in module.children():
        _shrink_sequentials(child)
    if not isinstance(module, nn.Sequential):
        return
    changed = True
    while changed:
        changed = False
        linears = [k for k, m in enumerate(module) if isinstance(m, nn.Linear)]
        for i, j in zip(linears, linears[1:]):
            between = [module[k] for k in range(i + 1, j)]
            if all(isinstance(m, ELEMENTWISE) for m in between):
                changed |= _shrink_pair(module, i, j)


def _choose_forms(module, batch_size, cost_model, device_type):
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and getattr(child, "sparsevd_origin", False):
            nnz = int((child.weight != 0).sum())
            form = cost_model.choose(child.out_features, child.in_features, nnz, batch_size, device_type,
                                     child.weight.element_size())
            if form == "csr":
                setattr(module, name, SparseLinear.from_dense(child.weight, child.bias))
        else:
            _choose_forms(child, batch_size, cost_model, device_type)


def sparsify(model, batch_size=1, cost_model=None, shrink=True):
    """An inference copy of ``model`` (eval mode) with every SparseVD layer pruned and
    replaced by a CSR :class:`SparseLinear` or a (smaller) dense ``nn.Linear``, whichever
    ``cost_model`` predicts faster at ``batch_size`` on the model's device. The result
    computes what ``model.eval()`` computes, up to float rounding. ``model`` is unchanged.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    cost_model = cost_model or CostModel()
    inference = copy.deepcopy(model).eval()
    for p in inference.parameters():
        p.requires_grad_(False)
    _replace_sparsevd(inference)
    if shrink:
        _shrink_sequentials(inference)
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    _choose_forms(inference, batch_size, cost_model, device_type)
    for m in inference.modules():
        if isinstance(m, nn.Linear) and hasattr(m, "sparsevd_origin"):
            del m.sparsevd_origin
    return inference
