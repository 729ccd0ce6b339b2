"""Triton kernels of sparsevd (installed as ``sparsevd.triton_kernels``).

- :mod:`.lrt`: the local-reparameterization linear layer, forward and backward, by the
  cuBLAS route or the fused-GEMM route, chosen per shape (the launchers and the rule).
- :mod:`.lrt_sample`: the Philox noise stream, the sampling step y = μ + s⊙z and its
  backward h = g⊙z/(2s) (also ``lrt_sample`` for convolutions).
- :mod:`.lrt_elementwise`: the passes around the GEMMs (x⊙x and exp(log σ²); the
  backward's epilogues).
- :mod:`.lrt_gemm`: the fused dual-GEMM kernels.
- :mod:`.kl`: the summed KL term of Sparse Variational Dropout and its gradients.
- :mod:`.sbp`: Structured Bayesian Pruning's KL and inverse-CDF sampler.

The launchers take plain tensors and return plain tensors; dispatch, autograd and
torch.library registration live in the ``sparsevd`` package. docs/gpu.md has what was
measured on the GPU, and what was tried and dropped.
"""
