"""The cost model sparsify() picks CSR or dense by, per layer: predicted time of each form."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceCost:
    """time ≈ overhead + max(bytes / bandwidth, flops / rate), one line per form."""

    dense_overhead_s: float
    dense_bandwidth: float  # bytes/s streaming the dense weight
    dense_rate_fp32: float  # flop/s of a strict-fp32 GEMM
    dense_rate_fast: float  # flop/s of a 16-bit (or TF32) GEMM
    csr_overhead_s: float
    csr_bandwidth: float  # bytes/s streaming values + indices
    csr_rate: float  # useful flop/s of the SpMM
    im2col_bandwidth: float = 1e9  # bytes/s of im2col patches (F.unfold + the copy the SpMM reads)


# Fitted to 4096x4096 at 98% sparsity, batch 1-4096 (the cases that decide the choice):
# CPU: this project's 2-core AMD EPYC CI machine, 2 threads; GPU: H100 80GB, torch 2.11.
# Both sets of measurements are in bench/results/.
# im2col: CPU measured on the CI machine (0.3-1.3 GB/s of patches for LeNet-5-sized inputs,
# against dense convolutions that never write patches); CUDA is an estimate, not measured.
CPU_COST = DeviceCost(3e-6, 21e9, 150e9, 150e9, 4e-6, 30e9, 42e9, im2col_bandwidth=1e9)
CUDA_COST = DeviceCost(6e-6, 2.4e12, 50e12, 420e12, 3e-6, 0.8e12, 3.5e12, im2col_bandwidth=0.5e12)


@dataclass(frozen=True)
class CostModel:
    """Predicts dense vs CSR time of a linear layer on a device type; pass your own
    :class:`DeviceCost` values to ``sparsify`` for other machines."""

    cpu: DeviceCost = CPU_COST
    cuda: DeviceCost = CUDA_COST
    #: Every layer kept in its own dense type (no CSR form, and no patch convolution run as
    #: a linear layer over patches): see :meth:`dense`.
    dense_only: bool = False

    @classmethod
    def dense(cls):
        """A cost model under which every layer stays dense, in its own type: ``sparsify``
        then gives the plain inference copy (θ ⊙ mask in ordinary dense layers, dead units
        cut) that the sparse forms have to beat."""
        return cls(cpu=dataclasses.replace(CPU_COST, csr_overhead_s=math.inf),
                   cuda=dataclasses.replace(CUDA_COST, csr_overhead_s=math.inf), dense_only=True)

    def time(self, form, out_features, in_features, nnz, batch, device_type, element_size=4):
        c = self.cuda if device_type == "cuda" else self.cpu
        if form == "dense":
            size = out_features * in_features
            fast = element_size < 4 or (device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
            rate = c.dense_rate_fast if fast else c.dense_rate_fp32
            return c.dense_overhead_s + max(size * element_size / c.dense_bandwidth, 2 * size * batch / rate)
        return c.csr_overhead_s + max(nnz * (element_size + 4) / c.csr_bandwidth, 2 * nnz * batch / c.csr_rate)

    def choose(self, out_features, in_features, nnz, batch, device_type, element_size=4):
        args = (out_features, in_features, nnz, batch, device_type, element_size)
        return "csr" if self.time("csr", *args) < self.time("dense", *args) else "dense"

    def conv_time(self, form, weight_shape, groups, nnz, batch, positions, device_type, element_size=4):
        """A convolution with weight ``[out, C / groups, *kernel]`` at ``positions`` output
        positions per example, as the GEMM [batch·positions, C/groups·∏kernel] ×
        [C/groups·∏kernel, out]. The CSR form first builds the im2col patches
        ([batch·positions, C·∏kernel]) at ``im2col_bandwidth``, which the dense
        convolution does not, so on CPU it pays only at very high sparsity and small inputs."""
        out_channels, patch = weight_shape[0], math.prod(weight_shape[1:])
        rows = batch * positions
        time = self.time(form, out_channels, patch, nnz, rows, device_type, element_size)
        if form == "csr":
            c = self.cuda if device_type == "cuda" else self.cpu
            time += rows * patch * groups * element_size / c.im2col_bandwidth
        return time

    def choose_conv(self, weight_shape, groups, nnz, batch, positions, device_type, element_size=4):
        args = (weight_shape, groups, nnz, batch, positions, device_type, element_size)
        return "csr" if self.conv_time("csr", *args) < self.conv_time("dense", *args) else "dense"
