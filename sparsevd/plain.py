"""When a module computes what its type says: the one rule every rewrite of a model uses.

``sparsify()`` and :class:`~sparsevd.FusedSequential` replace modules by what they compute
(a linear layer and the activation after it become one op; a BatchNorm is folded into the
convolution before it; a pruned unit is cut). They read a module's parameters and its
type's documented behaviour, not its ``forward``: that is exact only for a module whose
``forward`` *is* its type's, so anything that changes what a call computes rules it out:

- a subclass (its own ``forward``, or a base's forward reading overridden attributes);
- a ``forward`` assigned on the instance;
- forward hooks and pre-hooks, the module's own or global ones;
- parametrizations (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``,
  ``orthogonal``), whose weight is recomputed on every access. The legacy
  ``torch.nn.utils.weight_norm``/``spectral_norm`` recompute it in a forward pre-hook,
  so the hook rule covers them.

A module that fails the rule is left to run as itself; the rewrite goes around it.
"""

from __future__ import annotations

import torch.nn.modules.module as _module_state
from torch.nn.utils import parametrize

_OWN_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")


def runs_as(module, types):
    """True if ``module`` is exactly of one of ``types`` and computes what that type's
    ``forward`` computes: no subclass, no instance ``forward``, no forward hooks (its own or
    global), no parametrization."""
    if type(module) not in types or "forward" in module.__dict__:
        return False
    if any(getattr(module, name) for name in _OWN_HOOKS):
        return False
    if any(getattr(_module_state, name, None) for name in _GLOBAL_HOOKS):
        return False
    return not parametrize.is_parametrized(module)
