"""Loading the compiled extension ``sparsevd._C``, whose C++/CUDA kernels register
themselves for the CPU and CUDA dispatch keys when it loads.

An extension built against another torch can crash the process on load or later (the C++
ABI is not stable across releases), so it is loaded only when the torch running now is
the one it was built against (recorded by setup.py in ``sparsevd/_build_info.py``).
"""

from __future__ import annotations

import importlib

import torch

from .. import _warnings

#: Why the extension is not loaded (None when it is).
ERROR = None
#: Whether the loaded extension has CUDA kernels (a CUDAExtension build).
WITH_CUDA = False


class ExtensionVersionError(ImportError):
    """The extension was built against another torch than the one running."""


def load():
    global ERROR, WITH_CUDA
    try:
        build = importlib.import_module("sparsevd._build_info")
    except ImportError as error:
        ERROR = ImportError(f"sparsevd._C is not built ({error})")
        return False
    if build.TORCH_VERSION != torch.__version__:
        ERROR = ExtensionVersionError(
            f"sparsevd._C was built against torch {build.TORCH_VERSION} but torch {torch.__version__} is running; "
            "not loading it (an extension built for another torch can crash). Rebuild it for this torch: "
            "pip install --no-build-isolation -e . (or reinstall sparsevd)"
        )
        _warnings.warn(str(ERROR) + " Running on the reference kernels meanwhile.", RuntimeWarning)
        return False
    try:
        importlib.import_module("sparsevd._C")
    except ImportError as error:
        ERROR = error
        return False
    WITH_CUDA = bool(build.WITH_CUDA)
    return True
