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
from torch import nn

from . import backends, reference
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
#: Input shapes whose CUDA graphs are kept (each holds its own memory pool).
MAX_GRAPHS = 8


class _Chain:
    """A run of modules that one linear_chain op computes: an optional leading
    ``Flatten(1, -1)``, then linear layers, each followed by at most one activation.

    At batch 1 the op computes for a few microseconds, so the call around it must cost
    less: the layers' tensors are read straight from their ``_buffers``/``_parameters``
    dicts (a module's attribute lookup is a Python-level fallback), the op's arguments are
    bound once (:func:`sparsevd.backends.bind_linear_chain`) and bound again only when a
    layer holds other tensors (``load_state_dict``, ``.to()``) or an activation another
    parameter, and a CSR layer's indices are checked again only when their version counters
    say they were edited.
    """

    def __init__(self, flatten, layers, activations):
        self.flatten = flatten
        self.layers = layers  # linear modules
        self.sparse = [layer for layer in layers if isinstance(layer, SparseLinear)]
        self.in_features = layers[0].in_features
        self.activations = activations  # the activation module after each layer, or None
        self.codes = [0 if a is None else _ACTIVATIONS[type(a)](a)[0] for a in activations]
        self._bound = None  # (the tensors and parameters it was bound with, the bound call)

    def _state(self):
        """The tensors the layers hold now and the activations' parameters, flat."""
        state = []
        for layer in self.layers:
            if type(layer) is SparseLinear:
                buffers = layer._buffers
                state += (buffers["values"], buffers["crow_indices"], buffers["col_indices"])
            else:
                state += (layer._parameters["weight"], None, None)
            state.append(layer._parameters["bias"])
        state += [0.0 if a is None else _ACTIVATIONS[type(a)](a)[1] for a in self.activations]
        return state

    def _bind(self, state):
        for layer in self.sparse:  # indices replaced or edited since their layer checked them
            if layer._checked != layer._structure_key():
                layer._recheck()
        n = len(self.layers)
        call = backends.bind_linear_chain(state[0:4 * n:4], state[1:4 * n:4], state[2:4 * n:4], state[3:4 * n:4],
                                          self.codes, state[4 * n:], self.in_features, self.flatten,
                                          type(self.layers[0]).__name__)
        self._bound = (state, call)
        return call

    def __call__(self, x):
        state, bound = self._state(), self._bound
        if torch.compiler.is_compiling():  # a traced graph holds the op and its arguments, not a bound call
            n = len(self.layers)
            args = (state[0:4 * n:4], state[1:4 * n:4], state[2:4 * n:4], state[3:4 * n:4], self.codes, state[4 * n:])
            return backends.call_linear_chain(args, self.in_features, self.flatten, type(self.layers[0]).__name__, x)
        if bound is None or len(bound[0]) != len(state) or not all(map(operator.is_, bound[0], state)) \
                or bound[1].stale():
            return self._bind(state)(x)
        return bound[1](x)


def _plan(modules):
    """The modules as a list of steps: a module to call, or a _Chain of several."""
    steps, i, n = [], 0, len(modules)
    while i < n:
        start = i
        flatten = isinstance(modules[i], nn.Flatten) and (modules[i].start_dim, modules[i].end_dim) == (1, -1)
        j = i + 1 if flatten else i
        layers, activations = [], []
        while j < n and isinstance(modules[j], _LINEAR):
            if layers and modules[j].in_features != layers[-1].out_features:
                break  # a shape error the modules themselves should report
            layers.append(modules[j])
            activations.append(None)
            j += 1
            while j < n and isinstance(modules[j], _IDENTITIES):
                j += 1
            if j < n and type(modules[j]) in _ACTIVATIONS:
                activations[-1] = modules[j]
                j += 1
                while j < n and isinstance(modules[j], _IDENTITIES):
                    j += 1
        if layers:
            steps.append(_Chain(flatten, layers, activations))
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
        # Children replaced, added or removed since the last call: plan again.
        plan, modules = self._plan, self._modules.values()
        if plan is None or len(plan[0]) != len(modules) or not all(map(operator.is_, plan[0], modules)):
            plan = self._plan = (list(modules), _plan(list(modules)))
        return plan[1]

    def forward(self, input):
        steps = self._steps()
        if self.training or (torch.is_grad_enabled() and (input.requires_grad or self._trainable())):
            return super().forward(input)
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
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__()
        state["_graphs"] = OrderedDict()  # device objects, not data
        state["_plan"] = None
        return state
