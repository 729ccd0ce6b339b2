"""sparsify's per-module path: what it does inside each ``nn.Sequential`` of a model (the
whole path for an ``nn.Sequential`` model and for models torch.fx cannot trace).

Each SparseVD layer becomes its masked weight in the form a cost model predicts to be
fastest for the given batch size and device: CSR (:class:`SparseLinear`,
:class:`SparseConv2d`, :class:`SparseConv1d`) or a dense ``nn.Linear``/``nn.Conv*d``.
Before that, every :class:`SBPDropout` is folded into a neighbouring layer (its eval
multiplier E[θ]·mask scales that layer's output rows or input columns), and dead units are
cut: output units (convolution filters) whose weights are all pruned (their output is a
constant, folded into the next layer's bias where that is exact) and units whose outputs
no later layer reads, shrinking the neighbouring layers of a Sequential.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..attention import SparseVDMultiheadAttention
from ..conv import _SparseVDConvNd
from ..embedding import SparseEmbedding, SparseVDEmbedding
from ..inference import FusedSequential
from ..layers import SparseVDLinear
from ..patch_conv import PatchConv2d, is_patch_conv
from ..plain import runs_as
from ..report import kept_weights
from ..sbp import SBPDropout
from ..shapes import output_positions
from ..sparse import SparseConv1d, SparseConv2d, SparseLinear
from ..sparse_attention import SparseMultiheadAttention

#: Modules that act on each feature separately (in eval mode), so a unit can be cut
#: through them and a constant unit stays a constant.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Identity, nn.Dropout,
)
#: Modules that act on each channel of a convolution's output separately (in eval mode),
#: so a channel can be cut through them.
CHANNELWISE = ELEMENTWISE + (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Dropout1d, nn.Dropout2d,
)
_CONVS = (nn.Conv1d, nn.Conv2d)
_SPARSE_CONV = {nn.Conv1d: SparseConv1d, nn.Conv2d: SparseConv2d}


def _masked_dense(layer):
    """The dense torch layer holding θ ⊙ mask of a SparseVD layer (an exact eval-mode copy)."""
    with torch.no_grad():
        return _dense_like(layer, layer.weight * layer.mask(), layer.bias, origin=True)


#: SparseVD layers with an inference module of their own, built by f(layer, shrink); the
#: linear layers inside it are marked for _choose_forms.
INFERENCE_FORMS = {
    SparseVDMultiheadAttention: SparseMultiheadAttention.from_sparsevd,
    SparseVDEmbedding: lambda layer, shrink: SparseEmbedding.from_sparsevd(layer),
}


def replace_sparsevd(module, shrink):
    """Every SparseVD layer of ``module`` as the dense torch layer of its θ ⊙ mask, and every
    layer of :data:`INFERENCE_FORMS` as its inference module (``shrink``: with its dead
    parts, such as attention heads, cut)."""
    for name, child in module.named_children():
        if isinstance(child, (SparseVDLinear, _SparseVDConvNd)):
            setattr(module, name, _masked_dense(child))
        elif type(child) in INFERENCE_FORMS:
            setattr(module, name, INFERENCE_FORMS[type(child)](child, shrink))
        else:
            replace_sparsevd(child, shrink)


def _dense_like(layer, weight, bias, origin):
    """An nn.Linear, or an nn.Conv*d with ``layer``'s geometry, holding ``weight`` and ``bias``."""
    if isinstance(layer, (nn.Linear, SparseVDLinear)):
        kind, args = nn.Linear, (weight.shape[1], weight.shape[0])
    else:
        kind = layer.dense_type if isinstance(layer, _SparseVDConvNd) else type(layer)
        args = (weight.shape[1] * layer.groups, weight.shape[0], layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups)
    # skip_init: the weights are overwritten at once, so don't draw random ones first
    extra = {} if kind is nn.Linear else {"padding_mode": layer.padding_mode}
    dense = torch.nn.utils.skip_init(kind, *args, bias=bias is not None, device=weight.device, dtype=weight.dtype,
                                     **extra)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.sparsevd_origin = origin
    return dense


def _preserves_constants(module):
    """True if a channel that is one constant everywhere stays one constant through ``module``
    (average pooling over zero padding does not: the borders average in zeros)."""
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d)):
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        padded = any(p != 0 for p in padding)
        return not module.ceil_mode and not (padded and module.count_include_pad)
    return True


def _reads_constants_exactly(layer):
    """True if a constant input channel adds one constant to every output of ``layer``:
    a linear layer, or a convolution whose padding (if any) repeats the input's values."""
    if isinstance(layer, nn.Linear) or layer.padding == "valid" or layer.padding_mode != "zeros":
        return True
    return layer.padding != "same" and not any(layer.padding)


def _consumer_view(producer, consumer, channels):
    """``consumer``'s weight as [out, channels, reads per channel]: what it reads of each of
    ``producer``'s output channels (a Flatten between a convolution and a linear layer makes
    each channel a contiguous block of features), or None if that cannot be said."""
    w = consumer.weight.detach()
    if isinstance(consumer, nn.Linear):
        readable = w.shape[1] % channels == 0
    else:  # a convolution reads a linear layer's units only after a reshape, which we don't follow
        readable = not isinstance(producer, nn.Linear) and consumer.groups == 1
    return w.reshape(w.shape[0], channels, -1) if readable else None


def _shrink_pair(seq, i, j):
    """Cut the dead output units (filters) of seq[i] that seq[j] reads (elementwise or
    channelwise modules between them). Returns True if anything was cut."""
    a, b = seq[i], seq[j]
    wa = a.weight.detach()
    channels = wa.shape[0]
    view = _consumer_view(a, b, channels)
    if view is None:
        return False
    between = [seq[k] for k in range(i + 1, j)]
    ba = a.bias.detach() if a.bias is not None else wa.new_zeros(channels)
    dead = (wa.reshape(channels, -1) == 0).all(1)  # constant outputs: act(bias)
    unused = (view == 0).all(2).all(0)  # nothing downstream reads them
    if not (all(_preserves_constants(m) for m in between) and _reads_constants_exactly(b)):
        dead = torch.zeros_like(dead)  # a constant channel would not stay constant: keep it
    cut = dead | unused
    if bool(cut.all()):
        cut[0] = False  # keep one (zero or constant) unit so that no layer has zero channels
    if not bool(cut.any()):
        return False
    keep = ~cut
    new_b_bias = b.bias.detach().clone() if b.bias is not None else None
    fold = cut & dead & ~unused
    if bool(fold.any()):
        constant = ba.clone()
        with torch.no_grad():
            for m in between:
                if isinstance(m, ELEMENTWISE):  # pooling and flattening keep a constant
                    constant = m(constant)
        shift = view[:, fold].sum(2) @ constant[fold]
        new_b_bias = shift if new_b_bias is None else new_b_bias + shift
    wb = view[:, keep].reshape(view.shape[0], -1) if isinstance(b, nn.Linear) else b.weight.detach()[:, keep]
    seq[i] = _dense_like(a, wa[keep], None if a.bias is None else ba[keep], getattr(a, "sparsevd_origin", False))
    seq[j] = _dense_like(b, wb, new_b_bias, getattr(b, "sparsevd_origin", False))
    return True


def _pairable(seq, i, j):
    """True if seq[j] reads seq[i]'s output units one for one through what lies between."""
    a, between = seq[i], [seq[k] for k in range(i + 1, j)]
    if isinstance(a, nn.Linear):
        return all(runs_as(m, ELEMENTWISE) for m in between)
    if a.groups != 1:
        return False
    if isinstance(seq[j], nn.Linear):  # a convolution's channels reach a linear layer only through a Flatten
        flat = [m for m in between if runs_as(m, (nn.Flatten,))]
        if len(flat) != 1 or between[-1] is not flat[0] or (flat[0].start_dim, flat[0].end_dim) != (1, -1):
            return False
        between = between[:-1]
    return all(runs_as(m, CHANNELWISE) for m in between)


def _shrink_sequentials(module):
    for child in module.children():
        _shrink_sequentials(child)
    if not isinstance(module, nn.Sequential):
        return
    changed = True
    while changed:
        changed = False
        layers = [k for k, m in enumerate(module) if runs_as(m, (nn.Linear, *_CONVS))]
        for i, j in zip(layers, layers[1:]):
            if _pairable(module, i, j):
                changed |= _shrink_pair(module, i, j)


#: Modules f with f(s·x) = s·f(x) for a per-unit s ≥ 0 (in eval mode): an SBPDropout's
#: E[θ]·mask passes through them to the layer on the other side.
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
#: The same, acting on each channel of a convolution's output separately.
CHANNEL_HOMOGENEOUS = HOMOGENEOUS + (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _sbp_reads(sbp, layer, output):
    """True if ``sbp``'s units are ``layer``'s output units (``output``) or input units."""
    units = (layer.out_features if output else layer.in_features) if isinstance(layer, nn.Linear) else (
        layer.out_channels if output else layer.in_channels)
    dims = (1, -1) if isinstance(layer, nn.Linear) else (1,)
    return sbp.dim in dims and sbp.num_features == units and getattr(layer, "groups", 1) == 1


def _fold_batchnorm(layer, bn):
    """Fold an eval-mode BatchNorm that reads ``layer``'s outputs into ``layer``; False if it
    normalizes with batch statistics (no running ones), which no weight can express."""
    if bn.running_mean is None or bn.running_var is None or bn.num_features != layer.weight.shape[0]:
        return False
    with torch.no_grad():
        gain = torch.rsqrt(bn.running_var.to(layer.weight.dtype) + bn.eps)
        shift = -bn.running_mean.to(layer.weight.dtype)
        if bn.affine:
            gain = gain * bn.weight.to(layer.weight.dtype)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(shift)
        new_bias = (bias + shift) * gain + (bn.bias.to(layer.weight.dtype) if bn.affine else 0)
        layer.weight.mul_(gain.reshape(-1, *(1,) * (layer.weight.dim() - 1)))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias, requires_grad=False)
        else:
            layer.bias.copy_(new_bias)
    return True


def _fold_sbp_into_producer(seq, k, scale):
    """E[θ]·mask of the SBPDropout seq[k] into the output rows (weight, bias) of the layer
    before it, through a BatchNorm right after that layer (folded into it too) and
    positively homogeneous modules. True if done."""
    i = next((i for i in range(k - 1, -1, -1) if isinstance(seq[i], (nn.Linear, *_CONVS))), None)
    if i is None or not runs_as(seq[i], (nn.Linear, *_CONVS)) or not _sbp_reads(seq[k], seq[i], output=True):
        return False
    layer, between = seq[i], list(range(i + 1, k))
    allowed = HOMOGENEOUS if isinstance(layer, nn.Linear) else CHANNEL_HOMOGENEOUS
    norms = [n for n in between if runs_as(seq[n], _BATCHNORMS)]
    if not all(runs_as(seq[n], allowed) or n in norms for n in between):
        return False
    # a BatchNorm folds only where it reads the layer's outputs directly
    if norms and (norms != [i + 1] or not _fold_batchnorm(layer, seq[i + 1])):
        return False
    if norms:
        seq[i + 1] = nn.Identity()
    with torch.no_grad():
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.mul_(scale.to(layer.weight.dtype).reshape(shape))
        if layer.bias is not None:
            layer.bias.mul_(scale.to(layer.bias.dtype))
    # a BatchNorm after the SBP now reads the scaled layer directly: fold it as well, so
    # that the pruned units become constant and _shrink_sequentials can cut them
    after = next((n for n in range(k + 1, len(seq)) if not isinstance(seq[n], nn.Identity)), None)
    if after is not None and runs_as(seq[after], _BATCHNORMS) and _fold_batchnorm(layer, seq[after]):
        seq[after] = nn.Identity()
    return True


def _fold_sbp_into_consumer(seq, k, scale):
    """E[θ]·mask of the SBPDropout seq[k] into the input columns of the layer after it,
    through positively homogeneous modules (and a Flatten before a linear layer, whose
    inputs are then the units' blocks). True if done."""
    sbp = seq[k]
    j = next((j for j in range(k + 1, len(seq)) if isinstance(seq[j], (nn.Linear, *_CONVS))), None)
    if j is None or not runs_as(seq[j], (nn.Linear, *_CONVS)):
        return False
    layer, between = seq[j], [seq[n] for n in range(k + 1, j)]
    flat = [m for m in between if runs_as(m, (nn.Flatten,))]
    w = layer.weight
    if flat:
        if (len(flat) != 1 or between[-1] is not flat[0] or (flat[0].start_dim, flat[0].end_dim) != (1, -1)
                or not isinstance(layer, nn.Linear) or sbp.dim != 1 or w.shape[1] % sbp.num_features):
            return False
        between = between[:-1]
    elif not _sbp_reads(sbp, layer, output=False):
        return False
    if not all(runs_as(m, CHANNEL_HOMOGENEOUS if sbp.dim == 1 else HOMOGENEOUS) for m in between):
        return False
    with torch.no_grad():
        view = w.reshape(w.shape[0], sbp.num_features, -1) if isinstance(layer, nn.Linear) else w
        view.mul_(scale.to(w.dtype).reshape(1, -1, *(1,) * (view.dim() - 2)))
    return True


def _fold_sbp(module):
    """Replace every SBPDropout in an nn.Sequential by its eval multiplier E[θ]·mask folded
    into the layer before it or after it (exact; the pruned units become dead or unread, for
    _shrink_sequentials to cut). One that cannot be folded stays, computing the same in
    eval mode. A Sequential left with one layer (convert's ``Sequential(layer, SBPDropout)``)
    is replaced by that layer, so that its parent Sequential can shrink it."""
    for name, child in module.named_children():
        _fold_sbp(child)
        if isinstance(child, nn.Sequential) and getattr(child, "_sbp_folded", False):
            rest = [m for m in child if not isinstance(m, nn.Identity)]
            if len(rest) == 1:
                setattr(module, name, rest[0])
    if not isinstance(module, nn.Sequential):
        return
    for k in range(len(module)):
        if isinstance(module[k], SBPDropout):
            scale = module[k].eval_scale()
            if _fold_sbp_into_producer(module, k, scale) or _fold_sbp_into_consumer(module, k, scale):
                module[k] = nn.Identity()
                module._sbp_folded = True


def conv_form(conv, nnz, batch_size, positions, cost_model, device_type):
    """What sparsify puts in place of the pruned convolution ``conv`` (``nnz`` weights kept,
    ``positions`` output positions per example, None if unknown), or None to keep it.

    A patch convolution (stride equal to the kernel: a ViT's patch embedding) becomes a
    :class:`PatchConv2d` on the CPU, CSR or dense as the cost model prices the linear layer
    it is (dense when its positions are unknown): a reshape and one GEMM beat the
    convolution's call at every batch measured there; on CUDA it was not measured, so it
    stays a convolution, and so it does under ``CostModel.dense()`` (layers of their own
    types)."""
    size = conv.weight.element_size()
    if device_type == "cpu" and is_patch_conv(conv) and not cost_model.dense_only:
        patch = conv.weight[0].numel()
        sparse = positions is not None and cost_model.choose(conv.out_channels, patch, nnz, batch_size * positions,
                                                             device_type, size) == "csr"
        return PatchConv2d.from_conv(conv, sparse)
    if positions is not None and cost_model.choose_conv(conv.weight.shape, conv.groups, nnz, batch_size, positions,
                                                        device_type, size) == "csr":
        return _SPARSE_CONV[type(conv)].from_dense(conv)
    return None


def _choose_forms(module, batch_size, cost_model, device_type, positions, prefix=""):
    for name, child in module.named_children():
        full = prefix + name
        if isinstance(child, (nn.Linear, *_CONVS)) and getattr(child, "sparsevd_origin", False):
            nnz = kept_weights(child)[0]
            if isinstance(child, nn.Linear):
                form = cost_model.choose(child.out_features, child.in_features, nnz, batch_size, device_type,
                                         child.weight.element_size())
                if form == "csr":
                    setattr(module, name, SparseLinear.from_dense(child.weight, child.bias))
            else:
                replacement = conv_form(child, nnz, batch_size, positions.get(full), cost_model, device_type)
                if replacement is not None:
                    setattr(module, name, replacement)
        else:
            _choose_forms(child, batch_size, cost_model, device_type, positions, full + ".")


def _fuse_sequentials(module):
    """Every nn.Sequential as a FusedSequential (same children): chains of linear layers
    and activations then run as one op each."""
    for name, child in module.named_children():
        _fuse_sequentials(child)
        if type(child) is nn.Sequential:
            setattr(module, name, FusedSequential(OrderedDict(child._modules)))
    return FusedSequential(OrderedDict(module._modules)) if type(module) is nn.Sequential else module


def sparsify_modules(inference, batch_size, cost_model, shrink, input_shape):
    """The per-module path: SBPDropout folded, dead units cut and chains fused inside each
    nn.Sequential of ``inference`` (an eval-mode copy whose SparseVD layers are already
    masked dense layers); the rest of the model is opaque to it."""
    _fold_sbp(inference)
    positions = {} if input_shape is None else output_positions(inference, input_shape, _CONVS)
    if shrink:
        _shrink_sequentials(inference)
    device_type = next((p.device.type for p in inference.parameters()), "cpu")
    _choose_forms(inference, batch_size, cost_model, device_type, positions)
    return _fuse_sequentials(inference)
