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

from collections import OrderedDict

import torch
from torch import nn

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
#: Input shapes whose CUDA graphs are kept (each holds its own memory pool).
MAX_GRAPHS = 8


class _Chain:
    """A run of modules that one linear_chain op computes: an optional leading
    ``Flatten(1, -1)``, then linear layers, each followed by at most one activation."""

    def __init__(self, flatten, layers, activations):
        self.flatten = flatten
        self.layers = layers  # linear modules
        self.activations = activations  # the activation module after each layer, or None

    def __call__(self, x):
        if self.flatten:
            x = x.flatten(1)
        first = self.layers[0]
        if x.dim() == 0 or x.shape[-1] != first.in_features:
            raise ValueError(f"{type(first).__name__}: expected input of shape [*, {first.in_features}], "
                             f"got {tuple(x.shape)}")
        weights, crows, cols, biases, codes, params = [], [], [], [], [], []
        for layer, activation in zip(self.layers, self.activations):
            if isinstance(layer, SparseLinear):
                if layer._checked != layer._structure_key():
                    layer._recheck()
                weights.append(layer.values)
                crows.append(layer.crow_indices)
                cols.append(layer.col_indices)
            else:
                weights.append(layer.weight)
                crows.append(None)
                cols.append(None)
            biases.append(layer.bias)
            code, param = (0, 0.0) if activation is None else _ACTIVATIONS[type(activation)](activation)
            codes.append(code)
            params.append(param)
        lead = x.shape[:-1]
        if x.dim() != 2:
            x = x.reshape(-1, x.shape[-1])
        y = torch.ops.sparsevd.linear_chain(x, weights, crows, cols, biases, codes, params)
        return y if len(lead) == 1 else y.reshape(*lead, y.shape[-1])


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
        # Children replaced or added since the last call: plan again.
        key = tuple(map(id, self._modules.values()))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, _plan(list(self._modules.values())))
        return self._plan[1]

    def forward(self, input):
        if self.training or (torch.is_grad_enabled() and (input.requires_grad or self._trainable())):
            return super().forward(input)
        if self.cuda_graphs and input.is_cuda and not torch.compiler.is_compiling():
            return self._replay(input)
        return self._run(input)

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
