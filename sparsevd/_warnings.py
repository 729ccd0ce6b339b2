"""warn(): the package's warnings, attributed to the user's line.

A fixed ``stacklevel`` cannot name the user's call: the same warning is reached through
``nn.Module.__call__`` (two torch frames) or directly, and through one or several of the
package's own functions. Python's default filters show a DeprecationWarning only when it
is attributed to ``__main__``, so a wrong frame hides it. (Python 3.12's
``skip_file_prefixes`` does this; 3.10 and 3.11 have no such argument.)
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

#: The packages whose frames are never the user's: this one and torch (nn.Module.__call__,
#: torch.utils._contextlib's no_grad decorator, ...).
_SKIPPED = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (__file__, torch.__file__))


def _is_importlib(frame):
    # the frames warnings.warn itself skips when it counts stacklevel (see warnings._is_internal_frame)
    name = frame.f_code.co_filename
    return "importlib" in name and "_bootstrap" in name


def _is_skipped(frame):
    return os.path.abspath(frame.f_code.co_filename).startswith(_SKIPPED)


def warn(message, category=UserWarning):
    """``warnings.warn(message, category)`` attributed to the first frame of the call stack
    outside this package and torch: the user's line that led to it."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is warn()'s caller
    while frame is not None and _is_skipped(frame):
        frame = frame.f_back
        while frame is not None and _is_importlib(frame):
            frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
