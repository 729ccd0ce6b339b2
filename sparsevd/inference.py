"""FusedSequential: the container :func:`sparsevd.sparsify` returns for ``nn.Sequential``.

At small batches a pruned network's time goes to calling it, not to its arithmetic: one
Python module call and one op dispatch per layer and per activation cost more than the
few thousand multiply-adds of a 98 %-sparse layer. So each chain of linear layers (CSR
:class:`~sparsevd.SparseLinear` or dense ``nn.Linear``) with elementwise activations
between them runs as one op, ``sparsevd::linear_chain``; the other modules run as usual.
On CUDA, each input shape additionally gets a captured CUDA graph, replayed on later calls
with that shape, so a call costs one graph launch instead of a launch per kernel.

It is an ``nn.Sequential`` with the same children, indices and state dict; it runs them
one by one where fusing would change what they compute (training mode, autograd through
the input or a parameter that requires grad (:func:`~sparsevd.sparsify` returns
parameters that do not), global forward hooks). A module joins a chain only while it
computes exactly what its type says (:func:`sparsevd.plain.runs_as`: exact type, no
hooks, no parametrization, no ``forward`` of its own); any other runs as itself and the
chain splits around it. What can change that after a chain is planned (a hook added, a
parametrization registered, an activation's settings) is read on every call.
"""

from __future__ import annotations

import operator
from collections import OrderedDict

import torch
import torch.nn.modules.module as _module_state
from torch import nn

from . import backends, reference
from .plain import runs_as
from .sparse import SparseLinear

#: nn activation modules the chain op applies after a layer: module -> (code, parameter).
#: The codes are looked up by name once, here (default arguments), not on every call.
_CODE = reference.ACTIVATION_CODES
_ACTIVATIONS = {
    nn.ReLU: lambda m, c=_CODE["relu"]: (c, 0.0),
    nn.LeakyReLU: lambda m, c=_CODE["leaky_relu"]: (c, float(m.negative_slope)),
    nn.ReLU6: lambda m, c=_CODE["relu6"]: (c, 0.0),
    nn.ELU: lambda m, c=_CODE["elu"]: (c, float(m.alpha)),
    nn.Tanh: lambda m, c=_CODE["tanh"]: (c, 0.0),
    nn.Sigmoid: lambda m, c=_CODE["sigmoid"]: (c, 0.0),
    nn.GELU: lambda m, c=_CODE["gelu"], t=_CODE["gelu_tanh"]: (c if m.approximate == "none" else t, 0.0),
    nn.SiLU: lambda m, c=_CODE["silu"]: (c, 0.0),
}
#: What an eval-mode chain passes through unchanged.
_IDENTITIES = (nn.Identity, nn.Dropout)
_LINEAR = (nn.Linear, SparseLinear)
_NO_ACTIVATION = (0, 0.0)
_NO_INDICES = {None: None}
_ABSENT = object()  # what a dict lookup of a missing key gives
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

    The same C-level read of dicts watches what would make a module stop computing what
    the chain computes for it: a parametrization (it takes the layer's tensor out of its
    dict), a ``forward`` assigned on the instance, a Dropout switched to training, a
    Flatten's dims changed. The chain then runs its modules one by one and marks ``stale``
    for FusedSequential to plan again; hooks FusedSequential watches itself (``_watch``).
    """

    def __init__(self, modules, flatten, layers, activations):
        self.modules = modules  # every module the chain stands for, in order
        self.flatten = flatten
        self.layers = layers  # linear modules
        self.sparse = [layer for layer in layers if isinstance(layer, SparseLinear)]
        self.in_features = layers[0].in_features
        self.activations = activations  # the activation module after each layer, or None
        # what each call reads: four tensors per layer (values or weight, crow, col, bias; a
        # dense layer has no indices), then the watched module settings, whose planned
        # values are `_planned`
        tables, keys = [], []
        for layer in layers:
            if type(layer) is SparseLinear:
                tables += [layer._buffers] * 3
                keys += ["values", "crow_indices", "col_indices"]
            else:
                tables += [layer._parameters, _NO_INDICES, _NO_INDICES]
                keys += ["weight", None, None]
            tables.append(layer._parameters)
            keys.append("bias")
        self._n = len(tables)
        # a forward assigned on an instance is a key of its __dict__ (planned: absent)
        watched = [(m.__dict__, "forward", _ABSENT) for m in modules]
        watched += [(m.__dict__, "training", False) for m in modules if type(m) is nn.Dropout]
        if flatten:
            watched += [(modules[0].__dict__, "start_dim", 1), (modules[0].__dict__, "end_dim", -1)]
        self._tables, self._keys = tables + [w[0] for w in watched], keys + [w[1] for w in watched]
        self._absent = [_ABSENT] * len(self._tables)
        self._planned = [w[2] for w in watched]
        self.stale = None  # FusedSequential's list of hook dicts: the chain marks it to be planned again
        self._bound = None  # (the state and activation settings it was bound with, the bound call)

    def _args(self, state, settings):
        n = self._n
        return (state[0:n:4], state[1:n:4], state[2:n:4], state[3:n:4], [s[0] for s in settings],
                [s[1] for s in settings])

    def _bind(self, state, settings):
        for layer in self.sparse:  # indices replaced or edited since their layer checked them
            if layer._checked != layer._structure_key():
                layer._recheck()
        call = backends.bind_linear_chain(*self._args(state, settings), self.in_features, self.flatten,
                                          type(self.layers[0]).__name__)
        self._bound = (state, settings, call)
        return call

    def _intact(self, state):
        # (a parametrization takes the layer's tensor out of its dict)
        return all(t is not _ABSENT for t in state[:self._n]) and state[self._n:] == self._planned

    def _unfused(self, x):
        self.stale.append(_STALE)
        for module in self.modules:
            x = module(x)
        return x

    def __call__(self, x):
        state = list(map(dict.get, self._tables, self._keys, self._absent))
        settings = [_NO_ACTIVATION if a is None else _ACTIVATIONS[type(a)](a) for a in self.activations]
        bound = self._bound
        if bound is None or not all(map(operator.is_, bound[0], state)) or bound[1] != settings:
            # the first call, or something changed (small ints and bools are singletons)
            if not self._intact(state):
                return self._unfused(x)
            return self._bind(state, settings)(x)
        if bound[2].stale():
            return self._bind(state, settings)(x)
        return bound[2](x)

    def traced(self, x):
        """The call in a traced graph (torch.compile, torch.export): the op and its
        arguments, read afresh; no bound call."""
        state = list(map(dict.get, self._tables, self._keys, self._absent))
        if not self._intact(state):
            return self._unfused(x)
        settings = [_NO_ACTIVATION if a is None else _ACTIVATIONS[type(a)](a) for a in self.activations]
        return backends.call_linear_chain(self._args(state, settings), self.in_features, self.flatten,
                                          type(self.layers[0]).__name__, x)


def _watch(chains):
    """What FusedSequential reads on every call, besides its children, to see whether a
    chain's module changed since it was planned: every member's hook dicts (a list that
    the chains also mark when they find themselves stale)."""
    members = [m for chain in chains for m in chain.modules]
    hooks = [hooks for m in members for hooks in (m._forward_hooks, m._forward_pre_hooks)]
    for chain in chains:
        chain.stale = hooks
    return hooks


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
        # Children replaced, added or removed, or a chain's module changed (see _Chain and
        # _watch) since the last call: plan again. A module left out of a chain joins one
        # when the children change, or on train()/eval().
        plan, modules = self._plan, self._modules.values()
        if plan is None or plan[0] != list(modules) or any(plan[2]):
            steps = _plan(list(modules))
            plan = self._plan = (list(modules), steps, _watch([step for step in steps if type(step) is _Chain]))
            self._graphs.clear()  # captured from the old plan
        return plan[1]

    def forward(self, input):
        if self.training or (torch.is_grad_enabled() and (input.requires_grad or self._trainable())) \
                or _module_state._global_forward_hooks or _module_state._global_forward_pre_hooks:
            return super().forward(input)  # global hooks see every module's call
        steps = self._steps()
        if torch.compiler.is_compiling():
            for step in steps:
                input = step.traced(input) if type(step) is _Chain else step(input)
            return input
        if self.cuda_graphs and input.is_cuda:
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
