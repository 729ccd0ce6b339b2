"""Builds the optional C++/CUDA extension `sparsevd._C`.

SPARSEVD_BUILD=auto (default) builds a CUDAExtension when a CUDA toolkit and a CUDA
build of torch are present, else a CppExtension; `cuda`, `cpu` or `none` force a
choice. Without the extension the package runs on its pure-PyTorch reference path.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["sparsevd", "sparsevd.backends", "sparsevd.experiments", "sparsevd.triton_kernels"]
PACKAGE_DIR = {"sparsevd": "sparsevd", "sparsevd.triton_kernels": "triton_kernels"}


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    mode = os.environ.get("SPARSEVD_BUILD", "auto").lower()
    if mode not in ("auto", "cuda", "cpu", "none"):
        raise SystemExit(f"SPARSEVD_BUILD must be auto, cuda, cpu or none, not {mode!r}")
    if mode == "none":
        return [], {}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch finds the toolkit through `which nvcc` before /usr/local/cuda; a wrapper
        # script on PATH (as on our CI machines) would make it look in the wrong place.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    has_cuda = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "cuda" and not has_cuda:
        raise SystemExit("SPARSEVD_BUILD=cuda needs a CUDA toolkit (CUDA_HOME) and a CUDA build of torch")
    use_cuda = mode == "cuda" or (mode == "auto" and has_cuda)

    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3"]  # the C++ standard comes from BuildExtension, matching the torch headers
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is header-only: without OpenMP here it silently runs on one
        # thread. torch's own libgomp is reused, so torch.set_num_threads still applies.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        ext = cpp_extension.CUDAExtension(
            "sparsevd._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DSPARSEVD_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("sparsevd._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": _build_ext_recording(cpp_extension.BuildExtension, use_cuda)}


def _build_ext_recording(base, with_cuda):
    """build_ext that also writes ``sparsevd/_build_info.py`` next to the extension: the
    torch it was built against, which sparsevd checks before loading it (an extension
    built for another torch can crash the process)."""
    import torch

    class BuildExt(base.with_options(use_ninja=True)):
        def run(self):
            super().run()
            target = os.path.join(os.path.dirname(self.get_ext_fullpath("sparsevd._C")), "_build_info.py")
            with open(target, "w") as f:
                f.write("# Written by setup.py when sparsevd._C was built; read before loading it.\n"
                        f"TORCH_VERSION = {torch.__version__!r}\nWITH_CUDA = {with_cuda!r}\n")

    return BuildExt


ext_modules, cmdclass = _extension()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
