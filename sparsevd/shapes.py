"""Geometry of convolutions: the explicit padding of a padding option, and how many output
positions each convolution of a model computes per example (found by running one zero
example through the model, for FLOP counts and the convolution cost model)."""

from __future__ import annotations

import torch


def output_positions(model, input_shape, types):
    """{name: output positions per example (∏ of the spatial output size)} of the modules
    of ``types`` in ``model``, from a forward pass of a zero example of shape
    ``input_shape`` (without the batch dimension) in eval mode; the modules' train/eval
    flags are restored afterwards."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError as error:
        raise ValueError(f"input_shape must be a tuple of ints (one example, no batch), got {input_shape!r}") from error
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be positive sizes of one example (no batch), got {input_shape!r}")
    names = {m: name for name, m in model.named_modules() if isinstance(m, types)}
    positions = {}

    def record(module, args, output):
        positions[names[module]] = output.shape[2:].numel()

    first = next(model.parameters(), None)
    x = torch.zeros((1, *shape), dtype=first.dtype if first is not None else None,
                    device=first.device if first is not None else None)
    training = {m: m.training for m in model.modules()}
    hooks = [m.register_forward_hook(record) for m in names]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"input_shape {shape} does not fit {type(model).__name__}: {error}") from error
    finally:
        for hook in hooks:
            hook.remove()
        for m, flag in training.items():
            m.training = flag
    return positions


def explicit_padding(padding, kernel_size, dilation):
    """The ``F.pad`` argument (last dimension first, left then right) of a padding of ints
    or 'same'/'valid'; an odd 'same' total puts the extra element on the right, as torch does."""
    pad = []
    for i in reversed(range(len(kernel_size))):
        if padding == "valid":
            pad += [0, 0]
        elif padding == "same":
            total = dilation[i] * (kernel_size[i] - 1)
            pad += [total // 2, total - total // 2]
        else:
            pad += [padding[i], padding[i]]
    return tuple(pad)
