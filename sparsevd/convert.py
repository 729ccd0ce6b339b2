"""convert(model): swap the layers of a trained model for SparseVD ones, exactly, and say
what was done.

Fine-tuning a pretrained network with SparseVD (rather than training from scratch) is
how the authors compress large models: θ starts at the trained weights and log σ² low
enough (about −8 to −10) that the converted model computes what the original did.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _warnings, reference
from .attention import SparseVDMultiheadAttention, SparseVDTransformerEncoderLayer
from .conv import SparseVDConv1d, SparseVDConv2d
from .embedding import SparseVDEmbedding
from .layers import _VARIANCE_NAMES, SparseVDLinear, SparseVDModule, _variant
from .sbp import SBPDropout

logger = logging.getLogger(__name__)

#: convert() warns when the weights pruned at once change a layer's weight by more than
#: this (relative Frobenius norm). At −10 the weights with |θ| < 1.5e-3 are pruned, which
#: most trained layers barely notice; a higher log_sigma2_init cuts into the weights they use.
PRUNED_AT_ONCE_TOLERANCE = 1e-2

#: convert() warns when the layers it cannot convert hold more than this share of the weights.
UNSUPPORTED_SHARE_WARNING = 0.5

#: The torch layers convert() replaces, by exact type: a subclass (such as the
#: ``out_proj`` of nn.MultiheadAttention, whose weight the attention reads without calling
#: its forward) may not be used as its base class is, so it is left alone (an
#: nn.MultiheadAttention is converted whole, ``out_proj`` included).
CONVERTERS = {
    nn.Linear: SparseVDLinear.from_linear,
    nn.Conv1d: SparseVDConv1d.from_conv,
    nn.Conv2d: SparseVDConv2d.from_conv,
    nn.MultiheadAttention: SparseVDMultiheadAttention.from_attention,
    nn.Embedding: SparseVDEmbedding.from_embedding,
}
#: The layers an SBPDropout can follow (its units are their output units).
SBP_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: Normalisation layers: their few parameters stay dense by design, so they are not
#: reported as weights convert cannot convert.
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
#: Modules whose parameters are SparseVD or SBP already.
BAYESIAN = (SparseVDModule, SBPDropout, SparseVDMultiheadAttention)


def _type_name(kind):
    return f"nn.{kind.__name__}" if kind.__module__.startswith("torch.nn") else kind.__qualname__


SUPPORTED = ", ".join(_type_name(kind) for kind in CONVERTERS)


def _describe(arg):
    """A user's include/exclude argument as they would write it."""
    if isinstance(arg, type):
        return _type_name(arg)
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(_describe(a) for a in arg) + "]"
    return repr(arg)


@dataclass
class ConversionReport:
    """What :func:`convert` did. It is attached to the converted model as
    ``model.sparsevd_conversion`` and logged at INFO level by the ``sparsevd.convert``
    logger; ``str()`` gives a summary.

    - ``converted``: {layer name: "nn.Linear → SparseVDLinear"}, the layers replaced;
    - ``excluded``: the convertible layers left dense because ``include``/``exclude`` did
      not select them;
    - ``unsupported``: {type: [module names]}, largest first, the modules holding weights
      convert cannot convert (``nn.LSTM``, ``nn.GRU``, ``nn.Conv3d``, a subclass of
      ``nn.Linear``, ... and ``"ViT (custom parameters)"`` for parameters a model class
      registers itself, such as a class token); normalisation layers are not listed (dense
      by design);
    - ``sbp``: the layers followed by an SBPDropout;
    - ``output_layers``, ``output_found_by``: with ``sbp``, the layers whose outputs are the
      model's outputs (they get no SBPDropout unless ``sbp_output=True``) and how they were
      found (``"torch.fx"``, ``"forward hooks"`` or ``"last registered"``);
    - ``weights``: {category: number of parameters} for ``"converted"``, ``"excluded"``,
      ``"unsupported"``, ``"normalization"``, ``"sparsevd"`` (SparseVD or SBP already) and
      ``"total"``, each parameter counted once, as the model had them before conversion.
    """

    converted: dict = field(default_factory=dict)
    excluded: list = field(default_factory=list)
    unsupported: dict = field(default_factory=dict)
    sbp: list = field(default_factory=list)
    output_layers: list = field(default_factory=list)
    output_found_by: str | None = None
    weights: dict = field(default_factory=dict)

    @property
    def unsupported_share(self):
        """The share of the model's parameters held by modules convert cannot convert."""
        return self.weights.get("unsupported", 0) / max(self.weights.get("total", 0), 1)

    def __str__(self):
        w, total = self.weights, max(self.weights.get("total", 0), 1)

        def share(key):
            return f"{w.get(key, 0):,} weights ({w.get(key, 0) / total:.1%})"

        lines = [f"converted {len(self.converted)} layers, {share('converted')}:"]
        lines += [f"  {name}: {kind}" for name, kind in self.converted.items()]
        if self.excluded:
            lines.append(f"left dense by include/exclude: {', '.join(self.excluded)}: {share('excluded')}")
        if self.unsupported:
            kinds = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in self.unsupported.items())
            lines.append(f"not convertible (stay dense, not pruned): {kinds}: {share('unsupported')}")
        if w.get("normalization"):
            lines.append(f"normalisation layers (dense by design): {share('normalization')}")
        if w.get("sparsevd"):
            lines.append(f"SparseVD/SBP already: {share('sparsevd')}")
        if self.sbp or self.output_found_by:
            lines.append(f"SBPDropout after: {', '.join(self.sbp) or 'none'}")
            if self.output_layers:
                lines.append(f"output layers (found by {self.output_found_by}): {', '.join(self.output_layers)}")
        return "\n".join(lines)


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
        if isinstance(item, type) and item not in CONVERTERS:
            raise ValueError(f"convert: {what}={_describe(arg)}: {_type_name(item)} is not a type convert can "
                             f"convert; it converts {SUPPORTED} (select other modules by name pattern)")
    return [i for i in items if isinstance(i, str)], tuple(i for i in items if isinstance(i, type))


def _matches(selectors, name, module, used):
    patterns, types = selectors
    hit = type(module) in types
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
            threshold=reference.THRESHOLD, alpha="weight", inplace=False, sbp=False, sparsevd=True,
            sbp_output=False, example_inputs=None):
    """Replace the ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.MultiheadAttention`` and
    ``nn.Embedding`` layers of ``model`` by SparseVD layers with the same parameters,
    options, dtype and device, and return the model.

    - ``nn.Linear``/``nn.Conv*d`` → :class:`SparseVDLinear`/:class:`SparseVDConv1d`/:class:`SparseVDConv2d`;
    - ``nn.MultiheadAttention`` → :class:`~sparsevd.attention.SparseVDMultiheadAttention`,
      whose q/k/v and output projections are SparseVD linear layers (packed or separate
      projections, ``kdim``/``vdim``, biases, ``add_bias_kv``, ``add_zero_attn``,
      ``batch_first``, every mask and ``need_weights`` work as in torch);
    - ``nn.Embedding`` → :class:`~sparsevd.embedding.SparseVDEmbedding` (``padding_idx``
      and ``scale_grad_by_freq`` kept; an embedding with ``max_norm`` or ``sparse=True``
      is refused with an error: exclude it to keep it dense);
    - every ``nn.TransformerEncoderLayer`` that anything was converted in becomes a
      :class:`~sparsevd.attention.SparseVDTransformerEncoderLayer` (the same submodules
      and state dict, without torch's native fast path, which reads raw weights and would
      skip the masks), and its ``nn.TransformerEncoder`` stops building nested tensors
      (``use_nested_tensor = False``). Decoder layers and ``nn.Transformer`` have no fast
      path of their own beyond their attention's, and keep their types.

    ``include``/``exclude``: a module name pattern (``fnmatch``, matched against the full
    name from ``named_modules()``: ``"classifier.2"``, ``"encoder.*"``), one of the types
    above, or a list of them. Only layers that ``include`` selects (all when None) and
    ``exclude`` does not are converted; keeping the first or last layer dense is common.
    A name pattern that matches no convertible layer is an error (a typo would otherwise
    silently convert the layer it meant to keep), and so is a type convert cannot convert.

    ``log_sigma2_init``, ``threshold`` and ``alpha`` are the SparseVD layer options. The
    converted layers start with log α = log_sigma2_init − log θ², so weights with
    |θ| < exp((log_sigma2_init − threshold) / 2) are pruned at once (|θ| < 1.5e-3 at the
    default −10, as in the authors' recipe): in eval mode the converted model computes
    what ``model`` computes up to those weights, exactly when there are none. convert
    warns when they change a layer's weight by more than 1% (relative norm), i.e. when
    log_sigma2_init is too high for the model. ``inplace=False`` converts a deep copy.
    Layers keep their training mode and ``requires_grad``. A parameter shared by
    converted layers stays shared: an embedding tied to an output head
    (``head.weight is emb.weight``) gives two SparseVD layers with one θ and one log σ²,
    counted once by :func:`sparsevd.kl_divergence` and seen once by an optimizer.

    ``sbp=True`` (or a dict of :class:`SBPDropout` options: ``threshold``, ``bounds``,
    ``mu_init``, ``log_sigma_init``) also puts an SBPDropout on the output units of each
    converted linear or convolution layer (dim −1 after a linear layer, 1 after a
    convolution): the layer becomes ``nn.Sequential(layer, SBPDropout)`` (so ``fc``
    becomes ``fc.0`` and ``fc.1``), and :func:`sparsevd.sparsify` folds the pair back into
    one smaller layer. A fresh SBPDropout multiplies by E[θ] ≈ 0.995 in eval mode (θ ≤ 1),
    so the layer's weight and bias are divided by it: the pair computes what the layer
    did. No SBPDropout goes on the model's output layers (it would prune whole outputs,
    such as classes) unless ``sbp_output=True``, nor on a layer whose weight is shared
    (the division would change the other user of the weight). The output layers are
    those whose outputs reach the model's outputs without passing through another
    convertible layer: found by tracing the model with ``torch.fx``; when it cannot be
    traced, the last of the layers to run on ``example_inputs`` (a tensor or a tuple of
    the model's positional arguments, run once in eval mode without gradients) if given,
    else the last registered layer (``named_modules()`` order). ``sparsevd=False`` keeps
    the selected layers dense and only adds SBPDropout (SBP alone, as the authors train
    it from a pretrained network); it needs ``sbp``.

    The converted model carries a :class:`ConversionReport` as ``model.sparsevd_conversion``
    (also logged at INFO): what was converted, what was left dense by ``include``/
    ``exclude``, and which modules hold weights convert cannot convert (an ``nn.LSTM``,
    parameters of a model class, ...), with a warning when those hold more than half of
    the model's weights.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    for name, value in (("log_sigma2_init", log_sigma2_init), ("threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"convert: {name} must be a finite number, got {value!r}")
    _variant(alpha)
    sbp_options = _sbp_options(sbp, sparsevd)
    if not isinstance(sbp_output, bool):
        raise TypeError(f"convert: sbp_output must be True or False, got {sbp_output!r}")
    include_sel, exclude_sel = _selectors(include, "include"), _selectors(exclude, "exclude")
    if not inplace:
        model = copy.deepcopy(model)
    kinds = tuple(CONVERTERS) if sparsevd else SBP_TYPES
    candidates = [(name, m) for name, m in model.named_modules() if type(m) in kinds]
    used_in, used_ex = set(), set()
    chosen = {}
    for name, module in candidates:
        selected = include_sel is None or _matches(include_sel, name, module, used_in)
        if exclude_sel is not None and _matches(exclude_sel, name, module, used_ex):
            selected = False
        if selected:
            chosen[id(module)] = name
    names = [name for name, _ in candidates]
    if include_sel is not None:
        _check_used(include_sel, used_in, "include", names)
    if exclude_sel is not None:
        _check_used(exclude_sel, used_ex, "exclude", names)
    what = SUPPORTED if sparsevd else ", ".join(_type_name(k) for k in SBP_TYPES) + " (SBP alone)"
    if not chosen:
        raise ValueError(f"convert: {type(model).__name__} has no layer to convert (convert converts {what}; "
                         f"convertible layers: {names}; include={_describe(include)}, exclude={_describe(exclude)})")
    _refuse_unconvertible(model, chosen)

    report = ConversionReport()
    _census(model, chosen, {id(m) for _, m in candidates}, report)
    outputs = set()
    if sbp_options is not None and not sbp_output:
        sbp_layers = [(name, m) for name, m in candidates if isinstance(m, SBP_TYPES)]
        report.output_layers, report.output_found_by = _output_layers(model, sbp_layers, example_inputs)
        outputs = set(report.output_layers)
    shared_weights = _shared_weights(model)

    options = {"log_sigma2_init": float(log_sigma2_init), "threshold": float(threshold), "alpha": alpha}
    converted = {}  # id(old) -> what replaces it, so a layer used in two places stays one layer
    tied = {}  # id(old parameter) -> (new layer, parameter name): shared parameters stay shared

    def swap(old):
        if id(old) not in converted:
            name, new = chosen[id(old)], old
            if sparsevd:
                new = CONVERTERS[type(old)](old, **options).train(old.training)
                _keep_requires_grad(old, new)
                _keep_ties(old, new, tied)
                report.converted[name] = f"{_type_name(type(old))} → {type(new).__name__}"
            if (sbp_options is not None and isinstance(old, SBP_TYPES) and name not in outputs
                    and id(old.weight) not in shared_weights):
                new = _with_sbp(new, old, sbp_options)
                report.sbp.append(name)
            converted[id(old)] = new
        return converted[id(old)]

    if id(model) in chosen:
        model = swap(model)
    else:
        for parent in list(model.modules()):
            # _modules, not named_children(), which lists a layer used twice only once
            for child_name, child in list(parent._modules.items()):
                if child is not None and id(child) in chosen:
                    setattr(parent, child_name, swap(child))
    _decline_fast_paths(model, {id(m) for new in converted.values() for m in new.modules()})
    order = {name: k for k, name in enumerate(names)}
    report.converted = dict(sorted(report.converted.items(), key=lambda item: order[item[0]]))
    report.sbp.sort(key=order.get)
    if sparsevd:
        _warn_if_pruned([(f"{chosen[key]}.{sub}" if sub else chosen[key], layer)
                         for key, new in converted.items() for sub, layer in new.named_modules()
                         if isinstance(layer, SparseVDModule)], log_sigma2_init)
    if report.unsupported_share > UNSUPPORTED_SHARE_WARNING:
        where = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in report.unsupported.items())
        _warnings.warn(f"convert: {report.unsupported_share:.0%} of {type(model).__name__}'s weights are in modules "
                       f"it cannot convert ({where}): they stay dense and are not pruned (it converts {what}); see "
                       "model.sparsevd_conversion")
    model.sparsevd_conversion = report
    logger.info("convert(%s):\n%s", type(model).__name__, report)
    return model


def _refuse_unconvertible(model, chosen):
    """Errors for selected layers convert cannot convert faithfully, before anything changes."""
    for module in model.modules():
        name = chosen.get(id(module))
        if isinstance(module, nn.Embedding) and name is not None and (module.max_norm is not None or module.sparse):
            option = f"max_norm={module.max_norm}" if module.max_norm is not None else "sparse=True"
            raise ValueError(f"convert: embedding {name!r} has {option}, which SparseVDEmbedding does not support "
                             f"(see its documentation); exclude it (exclude={name!r}) to keep it dense")
        if (isinstance(module, nn.TransformerEncoderLayer) and type(module) is not nn.TransformerEncoderLayer
                and type(module).forward is nn.TransformerEncoderLayer.forward
                and any(id(m) in chosen for m in module.modules())):
            raise ValueError(f"convert: {type(module).__name__} is a subclass of nn.TransformerEncoderLayer with "
                             "torch's forward, whose native fast path reads raw weights and would skip the SparseVD "
                             "masks; give it a forward without the fast path (see SparseVDTransformerEncoderLayer), or "
                             "exclude the layers inside it")


def _census(model, chosen, candidates, report):
    """Fill ``report.weights``, ``.excluded`` and ``.unsupported``: every parameter, once, by
    the module that registers it (or the convertible layer above it)."""
    counts, unsupported, held, seen = defaultdict(int), defaultdict(list), defaultdict(int), set()

    def visit(module, name, category):
        if category is None:
            if id(module) in chosen:
                category = "converted"
            elif id(module) in candidates:
                category = "excluded"
                report.excluded.append(name)
            elif isinstance(module, BAYESIAN):
                category = "sparsevd"
            elif isinstance(module, NORMS):
                category = "normalization"
        own = [p for p in module._parameters.values() if p is not None and id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            counts[category or "unsupported"] += sum(p.numel() for p in own)
            if category is None:
                kind = type(module)
                key = _type_name(kind) if kind.__module__.startswith("torch.nn") else f"{kind.__qualname__} " \
                                                                                       "(custom parameters)"
                unsupported[key].append(name or "(the model)")
                held[key] += sum(p.numel() for p in own)
        for child_name, child in module._modules.items():
            if child is not None:
                visit(child, f"{name}.{child_name}" if name else child_name, category)

    visit(model, "", None)
    report.excluded = list(dict.fromkeys(report.excluded))
    report.unsupported = {key: unsupported[key] for key in sorted(unsupported, key=held.get, reverse=True)}
    report.weights = {k: counts[k] for k in ("converted", "excluded", "unsupported", "normalization", "sparsevd")}
    report.weights["total"] = sum(report.weights.values())


def _shared_weights(model):
    """ids of the weights that more than one module holds (SBP's compensation would change
    the other holder)."""
    holders = defaultdict(set)
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            holders[id(weight)].add(id(module))
    return {key for key, modules in holders.items() if len(modules) > 1}


def _keep_requires_grad(old, new):
    """A frozen parameter stays frozen in the layer that replaces it."""
    if isinstance(old, nn.MultiheadAttention):
        biases = old.in_proj_bias.chunk(3) if old.in_proj_bias is not None else (None,) * 3
        pairs = list(zip(
            SparseVDMultiheadAttention.source_weights(old) + biases + (old.out_proj.weight, old.out_proj.bias,
                                                                        old.bias_k, old.bias_v),
            (new.q_proj.weight, new.k_proj.weight, new.v_proj.weight, new.q_proj.bias, new.k_proj.bias,
             new.v_proj.bias, new.out_proj.weight, new.out_proj.bias, new.bias_k, new.bias_v)))
    else:
        pairs = [(old.weight, new.weight), (getattr(old, "bias", None), getattr(new, "bias", None))]
    for source, target in pairs:
        if source is not None and target is not None:
            target.requires_grad_(source.requires_grad)


def _keep_ties(old, new, tied):
    """Parameters the original layers share stay shared: a weight with its variance (one
    posterior), a bias as itself. The first layer converted holds them."""
    for name in ("weight", "bias"):
        parameter = old._parameters.get(name)
        if parameter is None or getattr(new, name, None) is None:
            continue
        holder, holder_name = tied.setdefault(id(parameter), (new, name))
        if holder is new or holder_name != name or getattr(holder, name).shape != getattr(new, name).shape:
            continue
        setattr(new, name, getattr(holder, name))
        if name == "weight" and getattr(holder, "variant", None) == new.variant:
            variance = _VARIANCE_NAMES[new.variant]
            setattr(new, variance, getattr(holder, variance))


def _decline_fast_paths(model, changed):
    """Encoder layers with anything converted inside run without torch's native fast path
    (see SparseVDTransformerEncoderLayer), and their stacks build no nested tensors."""
    for module in model.modules():
        if type(module) is nn.TransformerEncoderLayer and any(id(m) in changed for m in module.modules()):
            # the same object with a forward that calls its submodules: every attribute,
            # hook and parameter stays where it was
            module.__class__ = SparseVDTransformerEncoderLayer
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(layer, SparseVDTransformerEncoderLayer) for layer in module.layers):
            module.use_nested_tensor = False


def _output_layers(model, layers, example_inputs):
    """(names, how found) of the layers among ``layers`` ((name, module) pairs) whose outputs
    are the model's outputs; see :func:`convert`."""
    if not layers:
        return [], None
    traced = _traced_outputs(model, {name for name, _ in layers})
    if traced is not None:
        return traced, "torch.fx"
    if example_inputs is not None:
        return _last_to_run(model, layers, example_inputs), "forward hooks"
    return [layers[-1][0]], "last registered"


def _traced_outputs(model, names):
    """The layers of ``names`` reached backwards from the model's outputs without passing
    through another convertible layer, on the torch.fx graph; None if it cannot be traced."""
    leaves = {id(m) for m in model.modules() if type(m) in CONVERTERS or isinstance(m, BAYESIAN)}

    class Tracer(torch.fx.Tracer):
        # torch.nn containers (nn.TransformerEncoder, ...) are traced through, so that the
        # layers inside them are seen
        def is_leaf_module(self, m, qualified_name):
            return id(m) in leaves or (super().is_leaf_module(m, qualified_name) and not list(m.children()))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            graph = Tracer().trace(model)
        except Exception:  # noqa: BLE001 -- a model fx cannot trace (data-dependent control flow, ...) falls back
            return None
    modules = dict(model.named_modules())
    found, seen = [], set()
    stack = [node for node in graph.nodes if node.op == "output"]
    while stack:
        for node in stack.pop().all_input_nodes:
            if node in seen:
                continue
            seen.add(node)
            if node.op == "call_module" and id(modules.get(node.target)) in leaves:
                if node.target in names:
                    found.append(node.target)
                continue
            stack.append(node)
    return sorted(set(found), key=list(modules).index)


def _last_to_run(model, layers, example_inputs):
    """The last of ``layers`` to run in one eval-mode call on ``example_inputs``."""
    order = []
    hooks = [m.register_forward_hook(lambda module, args, output, name=name: order.append(name)) for name, m in layers]
    modes = [(m, m.training) for m in model.modules()]
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    except Exception as error:
        raise ValueError(f"convert: example_inputs do not fit {type(model).__name__}: {error}") from error
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in modes:
            m.training = mode
    return order[-1:]


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
    """``layer`` followed by an SBPDropout on its output units, the pair computing in eval
    mode what ``layer`` did."""
    linear = isinstance(original, nn.Linear)
    units = original.out_features if linear else original.out_channels
    sbp = SBPDropout(units, dim=-1 if linear else 1, device=original.weight.device, dtype=original.weight.dtype,
                     **options)
    # eval mode multiplies by E[θ]·mask, and E[θ] < 1 (θ = exp(x) with x ≤ 0): the output
    # rows are divided by it instead of starting the SBP units off 1
    scale = sbp.expected_theta()
    with torch.no_grad():
        layer.weight.div_(scale.reshape(-1, *(1,) * (layer.weight.dim() - 1)))
        if layer.bias is not None:
            layer.bias.div_(scale)
    if isinstance(layer, SparseVDModule):
        layer.reset_variance_parameters()  # a shared α starts from the layer's θ
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
        _warnings.warn(
            f"convert: with log_sigma2_init={log_sigma2_init} weights start with log α ≥ threshold and are pruned "
            f"at once ({'; '.join(pruned)}), so the converted model's eval output differs from the original's; "
            f"lower log_sigma2_init (or raise threshold) to keep them")
