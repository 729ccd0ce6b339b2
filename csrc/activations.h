// The activations of sparsevd::linear_chain: one table for the CPU kernels, the CUDA
// kernel and Python. A layer's activation is passed to the op as its code, the row of
// the table; sparsevd.reference.ACTIVATIONS lists the same names in the same order
// (the extension's activation_codes() gives {name: code} from this table, and
// tests/test_linear_chain.py checks that the two agree).
//
// Columns: enumerator, Python name, the value in double (x the input, p the
// parameter: leaky_relu's negative slope, elu's alpha), and the in-place ATen op on a
// tensor h (the CUDA kernel). A column is expanded only where it is used, so the ATen
// one needs ATen headers only in the file that expands it. A new activation also needs
// its SIMD form in csr_kernels.h's activate() (a static_assert there counts the rows).
#pragma once

#include <cstdint>

#define SPARSEVD_ACTIVATIONS(X)                                                              \
  X(kIdentity, "identity", x, (void)h)                                                       \
  X(kRelu, "relu", x < 0 ? 0.0 : x, at::relu_(h))                                            \
  X(kLeakyRelu, "leaky_relu", x < 0 ? x * p : x, at::leaky_relu_(h, p))                      \
  X(kRelu6, "relu6", x < 0 ? 0.0 : (x > 6 ? 6.0 : x), at::hardtanh_(h, 0.0, 6.0))            \
  X(kElu, "elu", x > 0 ? x : p * std::expm1(x), at::elu_(h, p))                              \
  X(kTanh, "tanh", std::tanh(x), at::tanh_(h))                                               \
  X(kSigmoid, "sigmoid", 1.0 / (1.0 + std::exp(-x)), at::sigmoid_(h))                        \
  X(kGelu, "gelu", 0.5 * x * (1.0 + std::erf(x * 0.70710678118654752440)),                   \
    at::gelu_(h, "none"))                                                                    \
  X(kGeluTanh, "gelu_tanh",                                                                  \
    0.5 * x * (1.0 + std::tanh(0.79788456080286535588 * (x + 0.044715 * x * x * x))),        \
    at::gelu_(h, "tanh"))                                                                    \
  X(kSilu, "silu", x / (1.0 + std::exp(-x)), at::silu_(h))

namespace sparsevd {

enum Act : int64_t {
#define SPARSEVD_ACT_ENUMERATOR(NAME, PY_NAME, SCALAR, ATEN_INPLACE) NAME,
  SPARSEVD_ACTIVATIONS(SPARSEVD_ACT_ENUMERATOR)
#undef SPARSEVD_ACT_ENUMERATOR
  kNumActs
};

}  // namespace sparsevd
