"""Fused Triton kernels of sparsevd (installed as ``sparsevd.triton_kernels``).

- :mod:`.lrt`: the local-reparameterization linear layer (forward, backward, noise).
- :mod:`.kl`: the summed KL term of Sparse Variational Dropout and its gradients.
- :mod:`.sbp`: Structured Bayesian Pruning's KL and inverse-CDF sampler.

The launchers take plain tensors and return plain tensors; dispatch, autograd and
torch.library registration live in the ``sparsevd`` package.
"""
