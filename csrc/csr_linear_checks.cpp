// sparsevd::csr_linear's argument checks (csr_linear_checks.h), for every device.
#include "csr_linear_checks.h"

#include <c10/util/Exception.h>

#include <cstdint>

namespace sparsevd {

int64_t csr_linear_check_args(const at::Tensor& x, const at::Tensor& crow_indices,
                              const at::Tensor& col_indices, const at::Tensor& values,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& row_order) {
  constexpr const char* op = "sparsevd::csr_linear";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(crow_indices.dim() == 1, op, ": crow_indices must be 1-D [N + 1], got shape ",
              crow_indices.sizes());
  TORCH_CHECK(col_indices.dim() == 1, op, ": col_indices must be 1-D [nnz], got shape ",
              col_indices.sizes());
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D [nnz], got shape ", values.sizes());
  TORCH_CHECK(crow_indices.scalar_type() == at::kInt, op,
              ": crow_indices must be int32, got ", crow_indices.scalar_type(),
              " (convert once with .to(torch.int32))");
  TORCH_CHECK(col_indices.scalar_type() == at::kInt, op,
              ": col_indices must be int32, got ", col_indices.scalar_type(),
              " (convert once with .to(torch.int32))");
  TORCH_CHECK(crow_indices.numel() >= 1, op,
              ": crow_indices must have N + 1 >= 1 entries, got an empty tensor");
  TORCH_CHECK(col_indices.numel() == values.numel(), op,
              ": col_indices and values must have the same length (nnz), got ",
              col_indices.numel(), " and ", values.numel());
  TORCH_CHECK(col_indices.numel() <= INT32_MAX, op, ": nnz must fit in int32, got ",
              col_indices.numel());
  const auto dtype = values.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              op, ": values must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(x.scalar_type() == dtype, op, ": x and values must have the same dtype, got ",
              x.scalar_type(), " and ", dtype);
  const auto device = x.device();
  TORCH_CHECK(crow_indices.device() == device && col_indices.device() == device &&
                  values.device() == device,
              op, ": all tensors must be on the same device, got x on ", device,
              ", crow_indices on ", crow_indices.device(), ", col_indices on ",
              col_indices.device(), ", values on ", values.device());
  TORCH_CHECK(x.size(1) > 0 || values.numel() == 0, op, ": x has K = 0 features but W has ",
              values.numel(), " non-zeros");
  const int64_t n = crow_indices.numel() - 1;
  if (bias.has_value() && bias->defined()) {
    const auto& b = *bias;
    TORCH_CHECK(b.device() == device, op, ": bias must be on the same device as x, got bias on ",
                b.device(), " and x on ", device);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n, op,
                ": bias must be 1-D with one entry per output feature (N = ",
                "crow_indices.numel() - 1 = ", n, "), got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == dtype, op, ": bias must have the dtype of x (", dtype,
                "), got ", b.scalar_type());
  }
  if (row_order.has_value() && row_order->defined()) {
    // That it is a permutation is checked once by its owner (functional.csr_linear,
    // SparseLinear), like the CSR structure: an O(N) pass per call would cost a launch.
    const auto& r = *row_order;
    TORCH_CHECK(r.dim() == 1 && r.numel() == n && r.scalar_type() == at::kInt, op,
                ": row_order must be a 1-D int32 permutation of the N = ", n, " rows, got ",
                r.scalar_type(), " of shape ", r.sizes());
    TORCH_CHECK(r.device() == device, op, ": row_order must be on the same device as x, got ",
                r.device(), " and x on ", device);
  }
  return n;
}

}  // namespace sparsevd
