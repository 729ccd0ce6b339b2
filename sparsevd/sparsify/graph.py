"""sparsify's graph path: the whole model as one torch.fx graph, rewritten.

The model is traced with torch.fx; torch layers, SparseVD and SBPDropout layers and
every module of this package are leaves (called, not traced into), and so is a submodule
whose ``forward`` fx cannot trace (a warning names it; nothing is cut across it). If the
model's own ``forward`` cannot be traced, or takes optional arguments (defaults,
``*args``, ``**kwargs``: a trace would fix the branches that test them, such as a KV
cache's ``caches=None``), sparsify falls back, with a warning, to the per-module path,
which keeps the model's class and methods.
Then, on the graph:

1. **BatchNorm** in eval mode (running statistics) that alone reads a convolution's or
   linear layer's output is folded into that layer's weight and bias: the same affine map.
2. **SBPDropout**: its eval multiplier s = E[θ]·mask ≥ 0 per unit is folded into the
   output rows of the layer before it (through ReLU, LeakyReLU, max/average pooling and
   dropout, which commute with a per-unit s ≥ 0), or into the input columns of every
   layer that reads it (also through a flatten); a BatchNorm it then reads directly is
   folded too. One that can be folded nowhere stays, computing what it did.
3. **Dead units.** Each output unit of a layer (a linear layer or convolution, groups 1,
   called once) is followed through every tensor that carries it one for one: elementwise
   activations, pooling, padding of the spatial dimensions, BatchNorm, dropout, arithmetic
   with a number, a flatten of ``[N, C, ...]`` to ``[N, C·…]`` (each unit a block of
   features), ``torch.cat`` along the units, and ``+``/``-`` of two such tensors, which ties
   unit i of one side to unit i of the other (in a residual block the shortcut's units and
   the block's last layer's are cut together or not at all). A unit can be cut only where
   every tensor carrying it is read by such steps or by a linear layer or convolution
   (groups 1) reading whole units; a unit read by anything else (another op, the model's
   output) stays. Then:

   - a layer output unit whose weights are all zero is a constant (its bias) everywhere,
     and stays one through the steps that carry it (average pooling that counts zero
     padding and padding with another value break it; those units count as varying);
   - a constant unit c read by a linear layer, or a convolution whose padding repeats
     the input (none, ``reflect``, ``replicate``, ``circular``), adds W[:, k]·c (summed
     over the kernel and the flattened block) to the reader's bias, and the reader stops
     reading it. A zero-padding convolution reads c at interior positions and 0 at the
     borders, so it absorbs only c = 0 (a unit that is zero everywhere, padding included);
   - a unit that no reader reads (all its columns zero) is cut from every tensor carrying
     it: the producing layers' rows, the BatchNorms' statistics, the readers' columns, its
     place in a concatenation. It changes no value anyone reads, so the cut is exact. A
     residual add keeps a unit as long as any reader of either side, or of the sum, reads it.

   This repeats until nothing changes (a reader that lost its inputs becomes constant).
4. Each SparseVD layer becomes CSR or dense by the cost model (convolutions only with
   ``input_shape``, which gives their output positions).
5. Chains of linear layers (CSR or dense) and elementwise activations, each tensor on the
   way read by the next step only, run as one ``linear_chain`` op: a
   :class:`~sparsevd.FusedSequential` module in the graph. A model that becomes one such
   module and nothing else (a class-style MLP) is returned as that module.

Ranks: without ``input_shape`` a convolution's input is taken to be batched ``[N, C, ...]``
(as for ``nn.Sequential``), and BatchNorm after a linear layer is not folded (its units
are dimension 1 only for 2-D inputs); with it, the shapes of one example decide.
Every module replaced is checked with :func:`sparsevd.plain.runs_as`: a subclass, a hook,
or a parametrization keeps a module opaque, run as it is.
"""

from __future__ import annotations

import functools
import inspect
import operator
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .._warnings import warn
from ..inference import _ACTIVATIONS, FusedSequential
from ..plain import runs_as
from ..report import kept_weights
from ..sbp import SBPDropout
from ..sparse import SparseLinear
from .sequential import (
    _BATCHNORMS,
    _CONVS,
    CHANNELWISE,
    ELEMENTWISE,
    _dense_like,
    _fold_batchnorm,
    _preserves_constants,
    conv_form,
    sparsify_modules,
)

_LAYERS = (nn.Linear, *_CONVS)
#: Called, not traced into, subclasses too: a subclass of a layer is one opaque step.
_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, SBPDropout)
_POOLS = tuple(t for t in CHANNELWISE if t not in ELEMENTWISE)
#: Functions and methods applied to each element alone.
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu, F.leaky_relu, F.relu6, F.elu,
    F.hardtanh, F.softplus, F.mish, F.hardswish, F.hardsigmoid, torch.nn.functional.relu_,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clone", "contiguous"}
#: f(s·x) = s·f(x) for s ≥ 0: an SBP multiplier moves through them.
_HOMOGENEOUS_FUNCTIONS = {torch.relu, F.relu, F.leaky_relu, torch.nn.functional.relu_}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "clone", "contiguous"}
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_MAX_POOLS = {F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d,
              F.adaptive_avg_pool2d}
_AVG_POOLS = {F.avg_pool1d, F.avg_pool2d}
_ADAPTIVE = {F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
_ARITHMETIC = {operator.add: torch.add, operator.iadd: torch.add, torch.add: torch.add, "add": torch.add,
               operator.sub: torch.sub, operator.isub: torch.sub, torch.sub: torch.sub, "sub": torch.sub,
               operator.mul: torch.mul, operator.imul: torch.mul, torch.mul: torch.mul, "mul": torch.mul,
               operator.truediv: torch.div, torch.div: torch.div, "div": torch.div}
#: Activation functions the chain op runs, as the module that computes them.
_ACTIVATION_FUNCTIONS = {
    torch.relu: lambda kw: nn.ReLU(), F.relu: lambda kw: nn.ReLU(), "relu": lambda kw: nn.ReLU(),
    torch.tanh: lambda kw: nn.Tanh(), F.tanh: lambda kw: nn.Tanh(), "tanh": lambda kw: nn.Tanh(),
    torch.sigmoid: lambda kw: nn.Sigmoid(), F.sigmoid: lambda kw: nn.Sigmoid(), "sigmoid": lambda kw: nn.Sigmoid(),
    F.silu: lambda kw: nn.SiLU(), F.relu6: lambda kw: nn.ReLU6(),
    F.gelu: lambda kw: nn.GELU(approximate=kw.get("approximate", "none")),
    F.leaky_relu: lambda kw: nn.LeakyReLU(kw.get("negative_slope", 0.01)),
}
_ACTIVATION_KWARGS = {F.gelu: ("approximate",), F.leaky_relu: ("negative_slope",), F.relu: ("inplace",)}


def _library_layer(m):
    """A layer of this package (not one of its example networks): called, not traced into."""
    name = type(m).__module__
    return name.startswith("sparsevd.") and not name.startswith("sparsevd.experiments.")


class _Tracer(fx.Tracer):
    """Leaves: torch and sparsevd modules (except containers) and the submodules in
    ``opaque``; records which module's forward it is tracing, to name one that fails."""

    def __init__(self, opaque=frozenset()):  # unpickling a GraphModule builds its tracer with no arguments
        super().__init__()
        self.opaque = opaque
        self.path = []
        self.failed = None  # the innermost module whose forward raised

    def is_leaf_module(self, m, qualified_name):
        if id(m) in self.opaque or isinstance(m, _LEAVES) or _library_layer(m):
            return type(m) is not FusedSequential
        return super().is_leaf_module(m, qualified_name)

    def call_module(self, m, forward, args, kwargs):
        if type(m) is FusedSequential:  # in eval mode it computes what its Sequential does
            forward = functools.partial(nn.Sequential.forward, m)
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = self.path[-1]
            raise
        finally:
            self.path.pop()


def _optional_arguments(model):
    """The names of the arguments of ``model.forward`` that have defaults or are ``*args``/
    ``**kwargs``: fx would trace one branch of whatever tests them (``caches is None`` is
    always False for a traced argument), so such a forward is not traced."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ["(no signature)"]
    return [p.name for p in parameters
            if p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _trace(model):
    """The fx GraphModule of ``model``, submodules that fx cannot trace kept as leaves (a
    warning each); None (and a warning) if the model's own forward cannot be traced or
    takes optional arguments."""
    optional = _optional_arguments(model)
    if optional:
        warn(f"sparsify: {type(model).__name__}.forward takes optional arguments ({', '.join(optional)}), whose "
             "branches a traced graph would fix; falling back to the per-module path (only the nn.Sequential "
             "parts of the model are sparsified, the model keeps its class and methods)")
        return None
    opaque = set()
    modules = dict(model.named_modules())
    while True:
        tracer = _Tracer(opaque)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = tracer.trace(model)
            return fx.GraphModule(model, graph)
        except Exception as error:  # noqa: BLE001 -- whatever stops fx names the part it stopped in
            failed = tracer.failed if tracer.failed and id(modules.get(tracer.failed)) not in opaque else None
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if failed is None:
                warn(f"sparsify: torch.fx cannot trace {type(model).__name__}.forward ({reason}); falling back to "
                     "the per-module path (only the nn.Sequential parts of the model are sparsified)")
                return None
            warn(f"sparsify: torch.fx cannot trace {failed} ({type(modules[failed]).__name__}: {reason}); it runs "
                 "as it is and nothing is cut across it")
            opaque.add(id(modules[failed]))


def _module(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _set_module(gm, target, module, calls):
    parent, _, name = target.rpartition(".")
    calls[id(module)] = calls[id(gm.get_submodule(target))]
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _is(node, function=None, method=None):
    return (node.op == "call_function" and node.target in (function or ())) or (
        node.op == "call_method" and node.target in (method or ()))


def _constant_args(node):
    """True if only the first argument of ``node`` is a graph value."""
    rest = list(node.args[1:]) + list(node.kwargs.values())
    found = []
    fx.node.map_arg(rest, found.append)
    return bool(node.args) and isinstance(node.args[0], fx.Node) and not found


def _arithmetic(node):
    """torch.add/sub/mul/div for ``node`` if it is one of them (operator, function or method)."""
    return _ARITHMETIC.get(node.target) if node.op in ("call_function", "call_method") else None


def _shape(node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Graph:
    """The rewrite of one traced model."""

    def __init__(self, gm, shapes):
        self.gm, self.shapes = gm, shapes
        self.calls = defaultdict(int)  # module -> call sites
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[id(_module(gm, node))] += 1

    # -- what a node is ------------------------------------------------------------------

    def layer(self, node):
        """The linear layer or convolution (groups 1) ``node`` calls alone, or None."""
        m = _module(self.gm, node)
        if m is None or not runs_as(m, _LAYERS) or self.calls[id(m)] != 1 or getattr(m, "groups", 1) != 1:
            return None
        return m if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node) else None

    def linear_dims_is_last(self, node):
        """True if the tensor of ``node`` (a linear layer's units on its last dimension) has
        them on dimension 1 too: known 2-D."""
        shape = _shape(node)
        return shape is not None and len(shape) == 2

    def flattens(self, node):
        """True if ``node`` flattens each example [N, C, ...] to [N, C·...]."""
        if isinstance(_module(self.gm, node), nn.Flatten):
            m = _module(self.gm, node)
            return runs_as(m, (nn.Flatten,)) and (m.start_dim, m.end_dim) == (1, -1)
        if _is(node, {torch.flatten}, {"flatten"}) and _constant_args(node):
            dims = list(node.args[1:]) + [node.kwargs.get(k) for k in ("start_dim", "end_dim") if k in node.kwargs]
            return dims in ([1], [1, -1])
        if _is(node, {torch.reshape}, {"view", "reshape"}) and self.shapes:
            before, after = _shape(node.args[0]), _shape(node)
            return (before is not None and after is not None and len(before) > 2 and len(after) == 2
                    and after[0] == before[0] and after[1] == torch.Size(before[1:]).numel())
        return False

    def channelwise(self, node, kind):
        """For ``node`` acting on each unit of a ``kind`` ('linear': units last, 'conv':
        units on dimension 1, 'flat': blocks of dimension 1) tensor alone: f(constants per
        unit) -> constants (NaN: not constant); None if it does not."""
        m = _module(self.gm, node)
        if m is not None:
            if len(node.args) != 1 or node.kwargs:
                return None
            if runs_as(m, ELEMENTWISE):
                return m
            if kind == "conv" and runs_as(m, _POOLS):
                return (lambda c: c) if _preserves_constants(m) else (lambda c: torch.full_like(c, float("nan")))
            if self._bn(node) is not None and (kind == "conv" or (kind == "linear" and self.linear_dims_is_last(node))):
                return lambda c: _batchnorm_of_constants(m, c)
            return None
        if not _constant_args(node):
            return None
        args, kwargs = node.args[1:], node.kwargs
        if _is(node, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS):
            if node.op == "call_method":
                return lambda c: getattr(c.clone(), node.target)(*args, **kwargs)
            return lambda c: node.target(c.clone(), *args, **kwargs)
        if _is(node, {F.dropout}) and (args[1:2] or [kwargs.get("training", True)])[0] is False:
            return lambda c: c
        target = _arithmetic(node)
        if target is not None and len(args) == 1 and not kwargs and isinstance(args[0], (int, float)):
            return lambda c: target(c, args[0])
        if kind != "conv":
            return None
        if _is(node, _MAX_POOLS) and not (args[5:6] or [kwargs.get("return_indices", False)])[0] and (
                node.target not in _ADAPTIVE or len(args) == 1):
            return lambda c: c  # max over a constant (padding is -inf), or a mean of one
        if _is(node, _AVG_POOLS):  # kernel and stride only: no padding, no ceil mode
            return (lambda c: c) if len(args) <= 2 and not kwargs else None
        if _is(node, {F.pad}):
            pad = args[0] if args else kwargs.get("pad")
            mode = args[1] if len(args) > 1 else kwargs.get("mode", "constant")
            value = args[2] if len(args) > 2 else kwargs.get("value", None)
            spatial = 2 * (len(_shape(node)) - 2) if _shape(node) else 2
            if not isinstance(pad, (tuple, list)) or len(pad) > spatial:
                return None
            if mode != "constant":
                return lambda c: c
            fill = 0.0 if value is None else float(value)
            return lambda c: torch.where(c == fill, c, torch.full_like(c, float("nan")))
        return None

    # -- 1, 2: BatchNorm and SBPDropout ---------------------------------------------------

    def fold_batchnorms(self):
        for node in list(self.gm.graph.nodes):
            bn = _module(self.gm, node)
            if bn is None or not runs_as(bn, _BATCHNORMS) or len(node.args) != 1 or node.kwargs:
                continue
            source = node.args[0]
            layer = _module(self.gm, source) if isinstance(source, fx.Node) else None
            if layer is None or not runs_as(layer, _LAYERS) or self.calls[id(layer)] != 1 or len(source.users) != 1 \
                    or self.calls[id(bn)] != 1:
                continue
            if isinstance(layer, nn.Linear) and not self.linear_dims_is_last(source):
                continue
            if _fold_batchnorm(layer, bn):
                node.replace_all_uses_with(source)
                self.gm.graph.erase_node(node)

    def fold_sbps(self):
        for node in list(self.gm.graph.nodes):
            sbp = _module(self.gm, node)
            if sbp is None or not runs_as(sbp, (SBPDropout,)) or len(node.args) != 1 or node.kwargs:
                continue
            scale = sbp.eval_scale()
            if self._sbp_into_producer(node, sbp, scale) or self._sbp_into_readers(node, sbp, scale):
                node.replace_all_uses_with(node.args[0])
                self.gm.graph.erase_node(node)

    def _units_match(self, sbp, layer, node, output):
        if sbp.num_features != layer.weight.shape[0 if output else 1]:
            return False
        if isinstance(layer, nn.Linear):
            return sbp.dim == -1 or (sbp.dim == 1 and self.linear_dims_is_last(node))
        return sbp.dim == 1

    def _homogeneous(self, node, conv):
        m = _module(self.gm, node)
        if m is not None:
            return len(node.args) == 1 and not node.kwargs and (
                runs_as(m, _HOMOGENEOUS_MODULES) or (conv and runs_as(m, _POOLS)))
        if not _constant_args(node):
            return False
        return _is(node, _HOMOGENEOUS_FUNCTIONS, _HOMOGENEOUS_METHODS) or (
            conv and _is(node, _MAX_POOLS | _AVG_POOLS))

    def _sbp_into_producer(self, node, sbp, scale):
        source, path = node.args[0], []
        while isinstance(source, fx.Node) and len(source.users) == 1 and self.layer(source) is None:
            path.append(source)
            if not source.args or not isinstance(source.args[0], fx.Node):
                return False
            source = source.args[0]
        layer = self.layer(source) if isinstance(source, fx.Node) and len(source.users) == 1 else None
        if layer is None or not self._units_match(sbp, layer, node, output=True):
            return False
        if not all(self._homogeneous(n, conv=isinstance(layer, _CONVS)) for n in path):
            return False
        with torch.no_grad():
            layer.weight.mul_(scale.to(layer.weight.dtype).reshape(-1, *(1,) * (layer.weight.dim() - 1)))
            if layer.bias is not None:
                layer.bias.mul_(scale.to(layer.bias.dtype))
        return True

    def _sbp_into_readers(self, node, sbp, scale):
        readers = []
        for user in node.users:
            flat = self.flattens(user) and len(user.users) == 1
            reader = next(iter(user.users)) if flat else user
            layer = self.layer(reader)
            if layer is None or reader.args[0] is not (user if flat else node):
                return False
            if flat:
                if not isinstance(layer, nn.Linear) or sbp.dim != 1 or layer.in_features % sbp.num_features:
                    return False
            elif not self._units_match(sbp, layer, node, output=False):
                return False
            readers.append(layer)
        for layer in readers:
            w = layer.weight
            view = w.reshape(w.shape[0], sbp.num_features, -1) if isinstance(layer, nn.Linear) else w
            view.mul_(scale.to(w.dtype).reshape(1, -1, *(1,) * (view.dim() - 2)))
        return bool(readers)

    # -- 3: dead units -----------------------------------------------------------------------

    def units(self):
        """The units each node carries, for the nodes that carry units one for one from
        layers: (unit ids per node (one class per set of units that must be cut together),
        kind per node, whether a node is flattened, the per-unit transfer function of each
        non-layer node, the nodes that add or subtract two such nodes). Other nodes are
        opaque."""
        parent = []

        def find(u):
            while parent[u] != u:
                parent[u] = parent[parent[u]]
                u = parent[u]
            return u

        ids, kind, flat, transfer, joins = {}, {}, {}, {}, set()
        for node in self.gm.graph.nodes:
            layer = self.layer(node)
            if layer is not None:
                width = layer.weight.shape[0]
                ids[node] = list(range(len(parent), len(parent) + width))
                parent.extend(ids[node])
                kind[node], flat[node] = "linear" if isinstance(layer, nn.Linear) else "conv", False
                continue
            inputs = [a for a in node.args if isinstance(a, fx.Node)]
            source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if source is not None and source in ids and len(inputs) == 2 and len(node.args) == 2 and \
                    not node.kwargs and node.args[1] in ids and _arithmetic(node) in (torch.add, torch.sub):
                other = node.args[1]
                if (kind[source], len(ids[source]), flat[source]) == (kind[other], len(ids[other]), flat[other]):
                    for a, b in zip(ids[source], ids[other]):
                        parent[find(b)] = find(a)
                    ids[node], kind[node], flat[node] = ids[source], kind[source], flat[source]
                    transfer[node] = _arithmetic(node)
                    joins.add(node)
                    continue
            parts = self._concatenated(node, ids, kind, flat)
            if parts is not None:
                ids[node], kind[node], flat[node] = [u for p in parts for u in ids[p]], kind[parts[0]], False
                transfer[node] = None
                continue
            if source is not None and source in ids and (len(inputs) == 1 or (
                    kind[source] == "conv" and self.flattens(node))):
                f = self.channelwise(node, "flat" if flat[source] else kind[source])
                is_flatten = kind[source] == "conv" and not flat[source] and self.flattens(node)
                if f is not None or is_flatten:
                    ids[node], kind[node], flat[node] = ids[source], kind[source], flat[source] or is_flatten
                    transfer[node] = f or (lambda c: c)
        ids = {node: torch.tensor([find(u) for u in units], dtype=torch.long) for node, units in ids.items()}
        return ids, kind, flat, transfer, joins

    def _concatenated(self, node, ids, kind, flat):
        """The nodes ``node`` concatenates along their units (``torch.cat``), or None."""
        if not _is(node, {torch.cat, torch.concat}) or not node.args or not isinstance(node.args[0], (list, tuple)):
            return None
        parts, rest = list(node.args[0]), list(node.args[1:]) + list(node.kwargs)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not parts or set(rest) - {dim, "dim"} or not all(isinstance(p, fx.Node) and p in ids for p in parts):
            return None
        kinds = {kind[p] for p in parts}
        if len(kinds) != 1 or any(flat[p] for p in parts):
            return None
        shape = _shape(node)
        if kinds == {"conv"}:
            ok = dim == 1 if shape is None else dim in (1, 1 - len(shape))
        else:
            ok = dim == -1 or (shape is not None and dim == len(shape) - 1) or (
                dim == 1 and shape is not None and len(shape) == 2)
        return parts if ok else None

    def constants(self, ids, transfer, joins):
        """Per node that carries units: their constant values (NaN where not constant)."""
        const = {}
        for node in self.gm.graph.nodes:
            if node not in ids:
                continue
            layer = self.layer(node)
            if layer is not None:
                w = layer.weight.detach()
                dead = (w.reshape(w.shape[0], -1) == 0).all(1)
                value = layer.bias.detach() if layer.bias is not None else w.new_zeros(w.shape[0])
                const[node] = torch.where(dead, value, torch.full_like(value, float("nan")))
            elif node in joins:
                const[node] = transfer[node](const[node.args[0]], const[node.args[1]])
            elif transfer[node] is None:  # a concatenation
                parts = [const[p] for p in node.args[0]]
                const[node] = torch.cat([p.to(parts[0].dtype) for p in parts])
            else:
                c = const[node.args[0]]
                known = ~torch.isnan(c)
                out = transfer[node](torch.where(known, c, torch.zeros_like(c)))
                const[node] = torch.where(known & ~torch.isnan(out), out, torch.full_like(out, float("nan")))
        return const

    def readers(self, ids, kind, flat):
        """[(reader layer node, the node it reads, its weight as [out, units, per unit])],
        and the units read by anything else (they stay)."""
        readers, blocked = [], set()
        for node in self.gm.graph.nodes:
            if _reads_metadata(node):
                continue
            for source in node.all_input_nodes:
                if source not in ids:
                    continue
                layer = self.layer(node)
                if layer is None and node in ids:
                    continue  # carries the units on (it is channelwise, a join or a concatenation)
                # a convolution reads the units of an unflattened convolution output; a linear
                # layer those of a linear layer's output, or their blocks after a flatten
                view = None
                if layer is not None and isinstance(layer, _CONVS) == (kind[source] == "conv" and not flat[source]):
                    view = self._view(layer, len(ids[source]), flat[source])
                if view is None:
                    blocked.update(ids[source].tolist())
                else:
                    readers.append((node, source, view))
        return readers, blocked

    def _view(self, layer, units, flattened):
        """``layer``'s weight as [out, units, per unit], or None if it does not read whole units."""
        w = layer.weight.detach()
        if isinstance(layer, nn.Linear):
            if (flattened and w.shape[1] % units) or (not flattened and w.shape[1] != units):
                return None
        elif w.shape[1] != units:
            return None
        return w.reshape(w.shape[0], units, -1)

    def cut_once(self):
        """One round: fold the constant units one reader reads into its bias, or else cut
        every unit no reader reads; True if anything changed."""
        ids, kind, flat, transfer, joins = self.units()
        const = self.constants(ids, transfer, joins)
        readers, blocked = self.readers(ids, kind, flat)
        for reader, source, view in readers:
            if blocked.issuperset(ids[source].tolist()):
                continue
            layer = self.layer(reader)
            c = const[source]
            known = ~torch.isnan(c) & (view != 0).any(2).any(0)
            exact = isinstance(layer, nn.Linear) or _reads_constants_exactly(layer)
            fold = known & (c == 0 if not exact else torch.ones_like(known))
            if bool(fold.any()):
                shift = view[:, fold].sum(2) @ c[fold].to(view.dtype)
                with torch.no_grad():
                    if layer.bias is None:
                        layer.bias = nn.Parameter(shift.clone(), requires_grad=False)
                    else:
                        layer.bias.add_(shift)
                    view[:, fold] = 0
                return True  # the reader's bias moved: the constants after it are stale
        used = set(blocked)
        for _, source, view in readers:
            used.update(ids[source][(view != 0).any(2).any(0).cpu()].tolist())
        for node in ids:  # keep one unit of each layer, so that no layer has zero of them
            if self.layer(node) is not None and not used.intersection(ids[node].tolist()):
                used.add(int(ids[node][0]))
        if all(used.issuperset(units.tolist()) for units in ids.values()):
            return False
        self._cut(ids, readers, used)
        return True

    def _bn(self, node):
        """The eval-mode BatchNorm (running statistics) ``node`` calls alone, or None."""
        m = _module(self.gm, node)
        ok = m is not None and runs_as(m, _BATCHNORMS) and m.running_mean is not None and self.calls[id(m)] == 1
        return m if ok and len(node.args) == 1 and not node.kwargs else None

    def _cut(self, ids, readers, used):
        """Cut the units not in ``used`` from every node that carries them: the layers'
        rows, the BatchNorms' statistics, the readers' columns (a layer that reads units it
        also writes loses both)."""
        gm, rows, columns = self.gm, {}, {}

        def keep(node):
            return torch.tensor([u in used for u in ids[node].tolist()], dtype=torch.bool)

        for node in ids:
            if self.layer(node) is not None:
                rows[node.target] = keep(node)
            elif self._bn(node) is not None:
                _set_module(gm, node.target, _sliced_batchnorm(self._bn(node), keep(node)), self.calls)
        for reader, source, view in readers:
            columns[reader.target] = (view.shape[1], keep(source))
        for target in rows.keys() | columns.keys():
            layer = gm.get_submodule(target)
            w, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
            if target in columns:
                units, kept = columns[target]
                w = w.reshape(w.shape[0], units, -1)[:, kept.to(w.device)]
                w = w.reshape(w.shape[0], -1) if isinstance(layer, nn.Linear) else w.reshape(
                    w.shape[0], -1, *layer.weight.shape[2:])
            if target in rows:
                kept = rows[target].to(w.device)
                w, bias = w[kept], None if bias is None else bias[kept]
            _set_module(gm, target, _dense_like(layer, w, bias, getattr(layer, "sparsevd_origin", False)), self.calls)

    # -- 4, 5: forms and chains ---------------------------------------------------------------

    def choose_forms(self, batch_size, cost_model):
        for node in self.gm.graph.nodes:
            m = _module(self.gm, node)
            if m is None or not isinstance(m, _LAYERS) or not getattr(m, "sparsevd_origin", False):
                continue
            device_type, size = m.weight.device.type, m.weight.element_size()
            nnz = kept_weights(m)[0]
            if isinstance(m, nn.Linear):
                if cost_model.choose(m.out_features, m.in_features, nnz, batch_size, device_type, size) == "csr":
                    _set_module(self.gm, node.target, SparseLinear.from_dense(m.weight, m.bias), self.calls)
            else:
                positions = None if _shape(node) is None else torch.Size(_shape(node)[2:]).numel()
                replacement = conv_form(m, nnz, batch_size, positions, cost_model, device_type)
                if replacement is not None:
                    _set_module(self.gm, node.target, replacement, self.calls)

    def inside_leaves(self, batch_size, cost_model, shrink):
        """The per-module path inside each module the graph calls as a whole (an
        untraceable one, a torch container such as ``nn.TransformerEncoder``, a sparsevd
        attention layer): what it does keeps the module's inputs and outputs."""
        done = set()
        for node in self.gm.graph.nodes:
            m = _module(self.gm, node)
            if m is None or id(m) in done or next(m.children(), None) is None:
                continue
            done.add(id(m))
            new = sparsify_modules(m, batch_size, cost_model, shrink, None)
            if new is not m:
                _set_module(self.gm, node.target, new, self.calls)

    def _linear(self, node):
        m = _module(self.gm, node)
        ok = m is not None and (type(m) is SparseLinear or runs_as(m, (nn.Linear,))) and self.calls[id(m)] <= 1
        return m if ok and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node) else None

    def _activation(self, node):
        """The activation module the chain op applies for ``node``, or None."""
        m = _module(self.gm, node)
        if m is not None:
            return m if len(node.args) == 1 and not node.kwargs and runs_as(m, tuple(_ACTIVATIONS)) else None
        make = _ACTIVATION_FUNCTIONS.get(node.target) if node.op in ("call_function", "call_method") else None
        if make is None or not _constant_args(node) or len(node.args) > 1 and node.target is not F.leaky_relu:
            return None
        kwargs = dict(node.kwargs)
        if node.target is F.leaky_relu and len(node.args) > 1:
            kwargs["negative_slope"] = node.args[1]
        if any(k not in _ACTIVATION_KWARGS.get(node.target, ()) for k in kwargs):
            return None
        kwargs.pop("inplace", None)
        return make(kwargs)

    def fuse_chains(self):
        graph, erased = self.gm.graph, set()
        for node in list(graph.nodes):
            if node in erased or self._linear(node) is None:
                continue
            steps, nodes, last = [], [], node
            source = node.args[0]
            if self.flattens(source) and len(source.users) == 1 and (
                    isinstance(_module(self.gm, source), nn.Flatten) or _is(source, {torch.flatten}, {"flatten"})):
                steps.append(nn.Flatten())
                nodes.append(source)
            while True:
                steps.append(self._linear(last))
                nodes.append(last)
                nxt = next(iter(last.users)) if len(last.users) == 1 else None
                act = self._activation(nxt) if nxt is not None else None
                if act is not None:
                    steps.append(act)
                    nodes.append(nxt)
                    last = nxt
                    nxt = next(iter(last.users)) if len(last.users) == 1 else None
                if nxt is None or self._linear(nxt) is None:
                    break
                last = nxt
            if len(steps) < 2:
                continue
            name = next(f"fused_chain_{i}" for i in range(len(graph.nodes) + 1)
                        if not hasattr(self.gm, f"fused_chain_{i}"))
            self.gm.add_submodule(name, FusedSequential(*steps))
            with graph.inserting_after(last):
                fused = graph.call_module(name, (nodes[0].args[0],))
            last.replace_all_uses_with(fused)
            for n in reversed(nodes):
                graph.erase_node(n)
            erased.update(nodes)


def _reads_metadata(node):
    """True for ``x.size()``/``x.dim()``/``x.shape``: they read no values."""
    return (node.op == "call_method" and node.target in ("size", "dim")) or (
        node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",)))


def _reads_constants_exactly(conv):
    if conv.padding == "valid" or conv.padding_mode != "zeros":
        return True
    return conv.padding != "same" and not any(conv.padding)


def _batchnorm_of_constants(bn, c):
    """What eval-mode ``bn`` makes of one constant per channel."""
    y = (c - bn.running_mean) * torch.rsqrt(bn.running_var + bn.eps)
    return y * bn.weight + bn.bias if bn.affine else y


def _sliced_batchnorm(bn, keep):
    new = type(bn)(int(keep.sum()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats, device=bn.running_mean.device,
                   dtype=bn.running_mean.dtype)
    keep = keep.to(bn.running_mean.device)
    with torch.no_grad():
        new.running_mean.copy_(bn.running_mean[keep])
        new.running_var.copy_(bn.running_var[keep])
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
    return new.eval()


def _shape_prop(gm, input_shape):
    """Node shapes from one batch of two zero examples (two, so that a view that keeps the
    batch can be told from one that does not)."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError) as error:
        raise ValueError(f"input_shape must be a tuple of ints (one example, no batch), got {input_shape!r}") from error
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be positive sizes of one example (no batch), got {input_shape!r}")
    first = next(gm.parameters(), None)
    x = torch.zeros((2, *shape), dtype=first.dtype if first is not None else None,
                    device=first.device if first is not None else None)
    try:
        ShapeProp(gm).propagate(x)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"input_shape {shape} does not fit the model: {error}") from error


def sparsify_graph(inference, batch_size, cost_model, shrink, input_shape):
    """The traced, rewritten ``inference`` model (eval mode, SparseVD layers already masked
    dense ones), or None if its forward cannot be traced."""
    gm = _trace(inference)
    if gm is None:
        return None
    for m in gm.modules():  # the layers are edited in place below: none may share a tensor with another
        if isinstance(m, _LAYERS + _BATCHNORMS):
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
    if input_shape is not None:
        _shape_prop(gm, input_shape)
    rewrite = _Graph(gm, input_shape is not None)
    rewrite.fold_batchnorms()
    rewrite.fold_sbps()
    rewrite.fold_batchnorms()
    # each round zeroes columns or cuts units, so this ends
    while shrink and rewrite.cut_once():
        pass
    rewrite.choose_forms(batch_size, cost_model)
    rewrite.inside_leaves(batch_size, cost_model, shrink)
    rewrite.fuse_chains()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return _only_module(gm) or gm


def _only_module(gm):
    """The one module a graph calls if that is all it does (input -> module -> output):
    returned instead of the GraphModule, whose call costs microseconds more."""
    nodes = list(gm.graph.nodes)
    if len(nodes) != 3 or [n.op for n in nodes] != ["placeholder", "call_module", "output"]:
        return None
    inner, out = nodes[1], nodes[2]
    if inner.args != (nodes[0],) or inner.kwargs or out.args != (inner,) or nodes[0].args:
        return None
    return gm.get_submodule(inner.target)
