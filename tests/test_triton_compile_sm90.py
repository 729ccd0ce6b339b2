"""Every Triton kernel compiles for the GPU (Hopper, sm_90), on a machine without one.

The interpreter runs the kernels' Python, not Triton's compiler: a kernel can pass every
interpreter test and still fail to compile for a real GPU (a type that does not unify, an
unsupported op). Triton compiles to PTX and cubin without a device, so CI checks that
here, in a subprocess without TRITON_INTERPRET, for each dtype and the constexpr
branches the launchers use.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent(
    """
    import importlib, os, pkgutil
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import sparsevd.triton_kernels as package
    from sparsevd.triton_kernels import kl, lrt_elementwise, lrt_gemm, lrt_sample, sbp

    TARGET = GPUTarget("cuda", 90, 32)
    INTS = {"M", "N", "K", "numel", "n", "start", "n_x", "n_ls", "n_p", "x_programs", "units"}
    FP32_POINTERS = {"partial_ptr", "out_ptr", "dbp_ptr", "z_ptr"}
    compiled = set()

    def jit_function(kernel):
        while not isinstance(kernel, triton.runtime.jit.JITFunction):
            kernel = kernel.fn  # through @autotune and @heuristics
        return kernel

    def compile_kernel(kernel, dtype, constexprs, floats=(), aligned=False, pointers=None):
        # aligned: the specialization the runtime gives 16-divisible sizes, strides and
        # addresses (the large problems), a different code path (cp.async pipelines, wgmma)
        fn = jit_function(kernel)
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in (pointers or {}):
                signature[name] = pointers[name]
            elif name.endswith("_ptr"):
                signature[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
            elif name in floats:
                signature[name] = "fp32"
            elif name == "seed" or name in INTS or name.startswith("stride"):
                signature[name] = "i64" if name in ("seed", "start") else "i32"
            else:
                raise AssertionError(f"{fn.__name__}: no signature rule for argument {name}")
        missing = [n for n, p in zip(fn.arg_names, fn.params) if p.is_constexpr and n not in constexprs]
        assert not missing, f"{fn.__name__}: constexprs not given: {missing}"
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if aligned and signature[name] in ("i32", "i64", "*fp32", f"*{dtype}") and name != "seed"}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), target=TARGET,
                       options={"num_warps": 8, "num_stages": 3})
        compiled.add(fn)

    gemm = {"GROUP": 8}
    for dtype in ("fp32", "fp16", "bf16"):
        precision = "ieee" if dtype == "fp32" else "tf32"  # strict fp32 (torch's default) and the MMAs
        for even in (False, True):
            compile_kernel(lrt_gemm._lrt_fwd_kernel, dtype, dict(
                gemm, HAS_BIAS=even, PRECISION=precision, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, EVEN_K=even),
                aligned=even)
            compile_kernel(lrt_gemm._lrt_dw_kernel, dtype, dict(
                gemm, COMPUTE_DW=True, COMPUTE_DLS=not even, PRECISION=precision, BLOCK_N=128, BLOCK_K=128,
                BLOCK_M=32, EVEN_M=even), aligned=even)
            compile_kernel(lrt_gemm._lrt_dx_kernel, dtype, dict(
                gemm, PRECISION=precision, BLOCK_M=128, BLOCK_K=128, BLOCK_N=32, EVEN_N=even), aligned=even)
        for wide in (False, True):
            compile_kernel(lrt_sample._rows_h_kernel, dtype, dict(WIDE=wide, COMPUTE_H=True, COMPUTE_DB=True,
                                                                   BLOCK_M=64, BLOCK_N=128))
            for from_var in (False, True):
                compile_kernel(lrt_sample._sample_kernel, dtype, dict(FROM_VAR=from_var, WIDE=wide, BLOCK=1024))
            compile_kernel(lrt_sample._half_noise_over_std_kernel, dtype, dict(WIDE=wide, BLOCK=1024))
            compile_kernel(lrt_elementwise._operands_kernel, dtype, dict(WIDE=wide, BLOCK=1024), aligned=wide)
            compile_kernel(lrt_elementwise._backward_epilogue_kernel, dtype, dict(WIDE=wide, BLOCK=1024),
                           aligned=wide)
        for grad_from_ptr in (False, True):
            compile_kernel(kl._kl_kernel, dtype, dict(COMPUTE_SUM=True, COMPUTE_GRAD=True,
                                                      GRAD_FROM_PTR=grad_from_ptr, BLOCK=1024),
                           floats=("grad_scale", "lo", "hi"))
    compile_kernel(lrt_sample._noise_kernel, "fp32", dict(WIDE=True, BLOCK=1024))
    compile_kernel(kl._sum_kernel, "fp32", dict(BLOCK=1024))
    for dtype in ("fp32", "fp16", "bf16"):
        for kl_, consts in ((True, False), (False, True)):
            compile_kernel(sbp._unit_kernel, dtype, dict(A=-20.0, B=0.0, KL=kl_, CONSTS=consts, BLOCK=256),
                           pointers={"kl_ptr": "*fp64", "consts_ptr": "*fp64"})
    for grad in (False, True):
        for wide in (False, True):
            compile_kernel(sbp._sample_kernel, "fp32", dict(A=-20.0, B=0.0, GRAD=grad, WIDE=wide, BLOCK=256),
                           pointers={"consts_ptr": "*fp64"})
    compile_kernel(sbp._noise_kernel, "fp32", dict(WIDE=True, BLOCK=1024))

    # every kernel of the package (a @triton.jit function named *_kernel) was compiled above
    kernels = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, (triton.runtime.jit.JITFunction, triton.runtime.autotuner.Autotuner,
                                  triton.runtime.autotuner.Heuristics)):
                fn = jit_function(value)
                if fn.__name__.endswith("_kernel"):
                    kernels.add(fn)
    left = sorted(f"{fn.__module__}.{fn.__name__}" for fn in kernels - compiled)
    assert not left, f"kernels this test does not compile: {left}"
    print("ok")
    """
)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests compile and run every kernel")
def test_every_triton_kernel_compiles_for_sm90():
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]
