"""FusedSequential: the container :func:`sparsevd.sparsify` returns for ``nn.Sequential``.

At small batches a pruned network's time goes to calling it, not to its arithmetic: one
Python module call and one op dispatch per layer and per activation cost more than the
few thousand multiply-adds of a 98 %-sparse layer. So each chain of linear layers (CSR
:class:`~sparsevd.SparseLinear` or dense ``nn.Linear``) with elementwise activations
between them runs as one op, ``sparsevd::linear_chain``; the other modules run as usual.
On CUDA, each input shape additionally gets a captured CUDA graph, replayed on later calls
with that shape, so a call costs one graph launch instead of a launch per kernel.

It is an ``nn.Sequential`` with the same children, indices and state dict; it runs them
one by one where fusing would change what they compute (training mode, or autograd
through the input or a parameter that requires grad; :func:`~sparsevd.sparsify` returns
parameters that do not).
"""

from __future__ import annotations

import operator
from collections import OrderedDict

import torch
import torch.nn.modules.module as _module_state
from torch import nn

from . import backends
from .plain import runs_as
from .sparse import SparseLinear

#: nn activation modules the chain op applies after a layer: module -> (code, parameter);
#: the codes are those of :data:`sparsevd.reference.ACTIVATIONS`.
_ACTIVATIONS = {
    nn.ReLU: lambda m: (1, 0.0),
    nn.LeakyReLU: lambda m: (2, float(m.negative_slope)),
    nn.ReLU6: lambda m: (3, 0.0),
    nn.ELU: lambda m: (4, float(m.alpha)),
    nn.Tanh: lambda m: (5, 0.0),
    nn.Sigmoid: lambda m: (6, 0.0),
    nn.GELU: lambda m: (7 if m.approximate == "none" else 8, 0.0),
    nn.SiLU: lambda m: (9, 0.0),
}
#: What an eval-mode chain passes through unchanged.
_IDENTITIES = (nn.Identity, nn.Dropout)
_LINEAR = (nn.Linear, SparseLinear)
_NO_ACTIVATION = (0, 0.0)
_NO_INDICES = {None: None}
_TRAINING = operator.attrgetter("training")
_STALE = {"stale": True}  # any() of a hook list holding it is true
#: Input shapes whose CUDA graphs are kept (each holds its own memory pool).
MAX_GRAPHS = 8


class _Chain:
    """A run of modules that one linear_chain op computes: an optional leading
    ``Flatten(1, -1)``, then linear layers, each followed by at most one activation, with
    eval-mode ``Identity``/``Dropout`` anywhere after the first layer.

    At batch 1 the op computes for a few microseconds, so the call around it must cost
    less: the layers' tensors are read straight from their ``_buffers``/``_parameters``
    dicts (a module's attribute lookup is a Python-level fallback), the op's arguments are
    bound once (:func:`sparsevd.backends.bind_linear_chain`) and bound again only when a
    layer holds other tensors (``load_state_dict``, ``.to()``) or an activation other
    settings (compared by value: ``LeakyReLU(0)`` reads as a new float each call), and a
    CSR layer's indices are checked again only when their version counters say they were
    edited.
    """

    def __init__(self, modules, flatten, layers, activations):
        self.modules = modules  # every module the chain stands for, in order
        self.flatten = flatten
        self.layers = layers  # linear modules
        self.sparse = [layer for layer in layers if isinstance(layer, SparseLinear)]
        self.in_features = layers[0].in_features
        self.activations = activations  # the activation module after each layer, or None
        # where each layer's tensors are read, four per layer: (values or weight, crow, col,
        # bias); a dense layer has no indices
        self._tables, self._keys = [], []
        for layer in layers:
            if type(layer) is SparseLinear:
                self._tables += [layer._buffers] * 3
                self._keys += ["values", "crow_indices", "col_indices"]
            else:
                self._tables += [layer._parameters, _NO_INDICES, _NO_INDICES]
                self._keys += ["weight", None, None]
            self._tables.append(layer._parameters)
            self._keys.append("bias")
        self.stale = None  # a list the chain marks when it finds itself out of date (see _Watch)
        self._bound = None  # (the tensors, the activation settings it was bound with, the bound call)

    def _args(self, tensors, settings):
        return (tensors[0::4], tensors[1::4], tensors[2::4], tensors[3::4], [s[0] for s in settings],
                [s[1] for s in settings])

    def _bind(self, tensors, settings):
        for layer in self.sparse:  # indices replaced or edited since their layer checked them
            if layer._checked != layer._structure_key():
                layer._recheck()
        call = backends.bind_linear_chain(*self._args(tensors, settings), self.in_features, self.flatten,
                                          type(self.layers[0]).__name__)
        self._bound = (tensors, settings, call)
        return call

    def __call__(self, x):
        try:
            tensors = list(map(operator.getitem, self._tables, self._keys))
        except KeyError:  # a parametrization took a layer's tensor out of its dict: run the modules
            self.stale.append(_STALE)
            for module in self.modules:
                x = module(x)
            return x
        settings = [_NO_ACTIVATION if a is None else _ACTIVATIONS[type(a)](a) for a in self.activations]
        if torch.compiler.is_compiling():  # a traced graph holds the op and its arguments, not a bound call
            return backends.call_linear_chain(self._args(tensors, settings), self.in_features, self.flatten,
                                              type(self.layers[0]).__name__, x)
        bound = self._bound
        if bound is None or not all(map(operator.is_, bound[0], tensors)) or bound[1] != settings \
                or bound[2].stale():
            return self._bind(tensors, settings)(x)
        return bound[2](x)


class _Watch:
    """What can make a planned chain's module stop computing what the chain computes for
    it, read on every call with C-level loops (a Python loop over the modules would cost
    as much as the op at batch 1): a hook added, a ``forward`` assigned on the instance, a
    Dropout switched to training, a Flatten's dims changed, or a parametrization
    registered (which the chain notices as a missing tensor, and marks in ``hooks``)."""

    def __init__(self, chains):
        members = [m for chain in chains for m in chain.modules]
        self.hooks = [hooks for m in members for hooks in (m._forward_hooks, m._forward_pre_hooks)]
        for chain in chains:
            chain.stale = self.hooks
        self.dicts = [m.__dict__ for m in members]
        self.forward = ["forward"] * len(members)
        self.dropouts = [m for m in members if type(m) is nn.Dropout]
        self.flattens = [chain.modules[0] for chain in chains if chain.flatten]

    def changed(self):
        if any(self.hooks) or any(map(operator.contains, self.dicts, self.forward)):
            return True
        if self.dropouts and any(map(_TRAINING, self.dropouts)):
            return True
        for flatten in self.flattens:
            if flatten.start_dim != 1 or flatten.end_dim != -1:
                return True
        return False


def _flattens_all(module):
    return (module.start_dim, module.end_dim) == (1, -1)


def _passes_through(module):
    """An eval-mode chain's identity: what the op may skip."""
    return runs_as(module, _IDENTITIES) and not (type(module) is nn.Dropout and module.training)


def _plan(modules):
    """The modules as a list of steps: a module to call, or a _Chain of several. A module
    joins a chain only if it runs exactly as its type says (:func:`sparsevd.plain.runs_as`:
    exact type, no hooks, no parametrization); any other module runs as itself, and the
    chain is split around it."""
    steps, i, n = [], 0, len(modules)
    while i < n:
        start = i
        flatten = runs_as(modules[i], (nn.Flatten,)) and _flattens_all(modules[i])
        j = i + 1 if flatten else i
        layers, activations = [], []
        while j < n and runs_as(modules[j], _LINEAR):
            if layers and modules[j].in_features != layers[-1].out_features:
                break  # a shape error the modules themselves should report
            layers.append(modules[j])
            activations.append(None)
            j += 1
            while j < n and _passes_through(modules[j]):
                j += 1
            if j < n and runs_as(modules[j], _ACTIVATIONS):
                activations[-1] = modules[j]
                j += 1
                while j < n and _passes_through(modules[j]):
                    j += 1
        if layers:
            steps.append(_Chain(list(modules[start:j]), flatten, layers, activations))
            i = j
        else:
            steps.append(modules[start])
            i = start + 1
    return steps


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose chains of linear layers and elementwise activations run
    as one op in eval mode, with a CUDA graph per input shape on CUDA (``cuda_graphs``).
    Build it like ``nn.Sequential`` or from one: ``FusedSequential(*seq)``."""

    def __init__(self, *args, cuda_graphs=True):
        super().__init__(*args)
        self.cuda_graphs = bool(cuda_graphs)
        self._plan = None
        self._graphs = OrderedDict()

    def _steps(self):
        # Children replaced, added or removed, or a chain's module changed (a hook, a
        # parametrization...) since the last call: plan again. A module left out of a chain
        # joins one when the children change or on train()/eval().
        plan, modules = self._plan, self._modules.values()
        if plan is None or len(plan[0]) != len(modules) or not all(map(operator.is_, plan[0], modules)) \
                or plan[2].changed():
            steps = _plan(list(modules))
            plan = self._plan = (list(modules), steps, _Watch([s for s in steps if type(s) is _Chain]))
        return plan[1]

    def forward(self, input):
        if self.training or (torch.is_grad_enabled() and (input.requires_grad or self._trainable())) \
                or _module_state._global_forward_hooks or _module_state._global_forward_pre_hooks:
            return super().forward(input)  # global hooks see every module's call
        steps = self._steps()
        if self.cuda_graphs and input.is_cuda and not torch.compiler.is_compiling():
            return self._replay(input)
        for step in steps:
            input = step(input)
        return input

    def _trainable(self):
        return any(p.requires_grad for p in self.parameters())

    def _run(self, x):
        for step in self._steps():
            x = step(x)
        return x

    def _tensor_addresses(self):
        return tuple(t.data_ptr() for t in self.parameters()) + tuple(t.data_ptr() for t in self.buffers())

    def _replay(self, x):
        # A graph reads the memory it was captured with: keyed by the input's layout and by
        # every parameter's and buffer's address (a load_state_dict or .to() that replaces
        # a tensor needs a new capture; in-place edits are read by the replay as they are).
        key = (x.shape, x.stride(), x.dtype, x.device, self._tensor_addresses())
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x)
            self._graphs[key] = entry
            if len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_x, static_y = entry
        static_x.copy_(x)
        graph.replay()
        return static_y.clone()  # the graph's output buffer is overwritten by the next replay

    def _capture(self, x):
        static_x = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy inits, allocator, checks
            for _ in range(2):
                self._run(static_x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = self._run(static_x)
        return graph, static_x, static_y

    def train(self, mode=True):
        self._graphs.clear()  # graphs belong to eval mode
        self._plan = None
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__()
        state["_graphs"] = OrderedDict()  # device objects, not data
        state["_plan"] = None
        return state
