"""convert(model): swap the linear and convolution layers of a trained model for SparseVD ones.

Fine-tuning a pretrained network with SparseVD (rather than training from scratch) is
how the authors compress large models: θ starts at the trained weights and log σ² low
enough (about −8 to −10) that the converted model computes what the original did.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings

from torch import nn

from . import reference
from .conv import SparseVDConv1d, SparseVDConv2d
from .layers import SparseVDLinear, _variant
from .sbp import SBPDropout

#: convert() warns when the weights pruned at once change a layer's weight by more than
#: this (relative Frobenius norm). At −10 the weights with |θ| < 1.5e-3 are pruned, which
#: most trained layers barely notice; a higher log_sigma2_init cuts into the weights they use.
PRUNED_AT_ONCE_TOLERANCE = 1e-2

#: The torch layers convert() replaces, by exact type: a subclass (such as the
#: ``out_proj`` of nn.MultiheadAttention, whose weight is read without calling its
#: forward) may not be used as its base class is, so it is left alone.
CONVERTERS = {
    nn.Linear: SparseVDLinear.from_linear,
    nn.Conv1d: SparseVDConv1d.from_conv,
    nn.Conv2d: SparseVDConv2d.from_conv,
}


def _selectors(arg, what):
    """(name patterns, types) from None, a str, a type, or an iterable of them."""
    if arg is None:
        return None
    items = [arg] if isinstance(arg, (str, type)) else arg
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"convert: {what} must be a module name pattern, a module type or a list of them, "
                        f"got {type(arg).__name__}") from None
    for item in items:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise TypeError(f"convert: {what} entries must be module name patterns (str) or nn.Module types, "
                            f"got {item!r}")
    return [i for i in items if isinstance(i, str)], tuple(i for i in items if isinstance(i, type))


def _matches(selectors, name, module, used):
    patterns, types = selectors
    hit = isinstance(module, types)
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            used.add(pattern)
            hit = True
    return hit


def _check_used(selectors, used, what, candidates):
    unused = [p for p in selectors[0] if p not in used]
    if unused:
        raise ValueError(f"convert: {what} pattern(s) {unused} match none of the convertible layers "
                         f"{candidates}")


def convert(model, *, include=None, exclude=None, log_sigma2_init=reference.LOG_SIGMA2_INIT,
            threshold=reference.THRESHOLD, alpha="weight",
            inplace=False, sbp=False, sparsevd=True):
    """Replace the ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers of ``model`` by
    SparseVD layers with the same θ, bias, geometry, dtype and device, and return the model.

    ``include``/``exclude``: a module name pattern (``fnmatch``, matched against the full
    name from ``named_modules()``: ``"classifier.2"``, ``"features.*"``), a module type
    (``nn.Conv2d``), or a list of them. Only layers that ``include`` selects (all when
    None) and ``exclude`` does not are converted; keeping the first or last layer dense
    is common. A name pattern that matches no convertible layer is an error (a typo
    would otherwise silently convert the layer it meant to keep).

    ``log_sigma2_init``, ``threshold`` and ``alpha`` are the SparseVD layer options. The
    converted layers start with log α = log_sigma2_init − log θ², so weights with
    |θ| < exp((log_sigma2_init − threshold) / 2) are pruned at once (|θ| < 1.5e-3 at the
    default −10, as in the authors' recipe): in eval mode the converted model computes
    what ``model`` computes up to those weights, exactly when there are none. convert
    warns when they change a layer's weight by more than 1% (relative norm), i.e. when
    log_sigma2_init is too high for the model. ``inplace=False`` converts a deep copy.
    Layers keep their training mode and ``requires_grad``; parameters shared between
    layers are no longer shared after conversion.

    ``sbp=True`` (or a dict of :class:`SBPDropout` options: ``threshold``, ``bounds``,
    ``mu_init``, ``log_sigma_init``) also puts an SBPDropout on the output units of each
    converted layer (dim −1 after a linear layer, 1 after a convolution): the layer becomes
    ``nn.Sequential(layer, SBPDropout)`` (so ``fc`` becomes ``fc.0`` and ``fc.1``), and
    :func:`sparsevd.sparsify` folds the pair back into one smaller layer.
    ``sparsevd=False`` keeps the selected layers dense and only adds SBPDropout (SBP alone,
    as the authors train it from a pretrained network); it needs ``sbp``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    for name, value in (("log_sigma2_init", log_sigma2_init), ("threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"convert: {name} must be a finite number, got {value!r}")
    _variant(alpha)
    sbp_options = _sbp_options(sbp, sparsevd)
    include, exclude = _selectors(include, "include"), _selectors(exclude, "exclude")
    if not inplace:
        model = copy.deepcopy(model)
    candidates = [(name, m) for name, m in model.named_modules() if type(m) in CONVERTERS]
    used_in, used_ex = set(), set()
    chosen = {}
    for name, module in candidates:
        selected = include is None or _matches(include, name, module, used_in)
        if exclude is not None and _matches(exclude, name, module, used_ex):
            selected = False
        if selected:
            chosen[id(module)] = name
    names = [name for name, _ in candidates]
    if include is not None:
        _check_used(include, used_in, "include", names)
    if exclude is not None:
        _check_used(exclude, used_ex, "exclude", names)
    if not chosen:
        raise ValueError(f"convert: {type(model).__name__} has no nn.Linear/nn.Conv1d/nn.Conv2d layer to convert "
                         f"(convertible layers: {names}; include={include}, exclude={exclude})")

    options = {"log_sigma2_init": float(log_sigma2_init), "threshold": float(threshold), "alpha": alpha}
    converted = {}  # id(old) -> (name, new), so a layer used in two places stays one layer

    def swap(old):
        if id(old) not in converted:
            new = old
            if sparsevd:
                new = CONVERTERS[type(old)](old, **options).train(old.training)
                new.weight.requires_grad_(old.weight.requires_grad)
                if old.bias is not None:
                    new.bias.requires_grad_(old.bias.requires_grad)
            converted[id(old)] = (chosen[id(old)], new, _with_sbp(new, old, sbp_options))
        return converted[id(old)][2]

    if id(model) in chosen:
        model = swap(model)
    else:
        for parent in list(model.modules()):
            # _modules, not named_children(), which lists a layer used twice only once
            for child_name, child in list(parent._modules.items()):
                if child is not None and id(child) in chosen:
                    setattr(parent, child_name, swap(child))
    if sparsevd:
        _warn_if_pruned([(name, layer) for name, layer, _ in converted.values()], log_sigma2_init)
    return model


def _sbp_options(sbp, sparsevd):
    """The SBPDropout options of ``sbp`` (None for no SBP), checked before anything is converted."""
    if not isinstance(sparsevd, bool):
        raise TypeError(f"convert: sparsevd must be True or False, got {sparsevd!r}")
    if sbp is False or sbp is None:
        if not sparsevd:
            raise ValueError("convert: sparsevd=False without sbp would change nothing; pass sbp=True to add "
                             "SBPDropout layers to dense ones")
        return None
    options = {} if sbp is True else sbp
    if not isinstance(options, dict):
        raise TypeError(f"convert: sbp must be True, False or a dict of SBPDropout options, got {sbp!r}")
    allowed = {"threshold", "bounds", "mu_init", "log_sigma_init"}
    if set(options) - allowed:
        raise ValueError(f"convert: unknown SBPDropout options {sorted(set(options) - allowed)} (allowed: "
                         f"{sorted(allowed)})")
    SBPDropout(1, **options)  # checks the values once
    return options


def _with_sbp(layer, original, options):
    """``layer``, followed by an SBPDropout on its output units when ``options`` is not None."""
    if options is None:
        return layer
    linear = isinstance(original, nn.Linear)
    units = original.out_features if linear else original.out_channels
    sbp = SBPDropout(units, dim=-1 if linear else 1, device=original.weight.device, dtype=original.weight.dtype,
                     **options)
    return nn.Sequential(layer, sbp).train(original.training)


def _warn_if_pruned(named_layers, log_sigma2_init):
    pruned = []
    for name, layer in named_layers:
        weight = layer.weight.detach()
        lost = weight * ~layer.mask()
        change = (lost.norm() / weight.norm()).item() if weight.numel() else 0.0
        if change > PRUNED_AT_ONCE_TOLERANCE:
            pruned.append(f"{name or 'the model'}: {int((lost != 0).sum())} of {weight.numel()} weights, "
                          f"{change:.1%} of the weight norm")
    if pruned:
        warnings.warn(
            f"convert: with log_sigma2_init={log_sigma2_init} weights start with log α ≥ threshold and are pruned "
            f"at once ({'; '.join(pruned)}), so the converted model's eval output differs from the original's; "
            f"lower log_sigma2_init (or raise threshold) to keep them",
            stacklevel=3,
        )
