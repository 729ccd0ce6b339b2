"""Checks of the numbers and flags the public API takes: a wrong type is a TypeError, a
wrong value a ValueError, each naming where (``where``: the layer or function) and which
argument, with what was expected.

Numbers come as Python ints and floats, numpy scalars (``len()`` of some data sets is a
``numpy.int64``) and 0-d tensors; a bool is refused where a number is expected (it is an
int to Python, but ``threshold=True`` is a mistake, never a value).
"""

from __future__ import annotations

import math
import numbers
import sys

import torch


def _scalar_tensor(value):
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool \
        and not value.dtype.is_complex


def real(where, name, value, what="a finite real number", check=math.isfinite):
    """``value`` as a float; TypeError unless a real number (not a bool), ValueError unless
    ``check(value)`` (default: finite). ``what`` says what is expected in the message."""
    if type(value) is not float and type(value) is not int:  # plain numbers skip the slower checks
        if _scalar_tensor(value):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where}: {name} must be {what}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not check(value):
        raise ValueError(f"{where}: {name} must be {what}, got {value}")
    return value


def integer(where, name, value, minimum=None, what=None):
    """``value`` as an int; TypeError unless an integer (Python, numpy or a 0-d integral
    tensor; not a bool, not a float), ValueError below ``minimum``."""
    what = what or ("an int" if minimum is None else f"an int ≥ {minimum}")
    if type(value) is not int:  # a plain int skips the slower checks
        if _scalar_tensor(value) and not value.is_floating_point():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{where}: {name} must be {what}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: {name} must be {what}, got {value}")
    return value


def interval(where, name, value, bounds=("lo", "hi")):
    """``value``, two finite real numbers lo < hi, as a tuple of floats (``bounds`` names them)."""
    lo, hi = bounds
    what = f"two finite numbers ({lo}, {hi}) with {lo} < {hi}"
    try:
        first, second = value
    except (TypeError, ValueError):
        raise TypeError(f"{where}: {name} must be {what}, got {value!r}") from None
    first, second = real(where, name, first, what), real(where, name, second, what)
    if not first < second:
        raise ValueError(f"{where}: {name} must be {what}, got {value!r}")
    return first, second


def flag(where, name, value):
    """``value`` as a bool; TypeError unless True or False (a Python or numpy bool)."""
    numpy = sys.modules.get("numpy")  # a numpy bool exists only once numpy is imported
    if isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_)):
        return bool(value)
    raise TypeError(f"{where}: {name} must be True or False, got {value!r} ({type(value).__name__})")


def module(where, value):
    """``value``, checked to be an ``nn.Module`` (TypeError)."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{where} expects an nn.Module, got {type(value).__name__}")
    return value


def floating_dtype(where, dtype):
    """``dtype`` (None: torch's default), checked to be a floating-point torch.dtype (TypeError):
    the parameters of a layer that learns are."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{where}: dtype must be a floating-point torch.dtype (or None), got {dtype!r}")
    return dtype
