// Fused CPU kernels for the SparseVD KL term: one sweep over θ and log σ² per call.
// Eager PyTorch spends ~10 passes and as many temporaries on the same arithmetic.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace sparsevd {
namespace {

constexpr double kK1 = 0.63576, kK2 = 1.87320, kK3 = 1.48695, kEps = 1e-8;
// Fixed chunks (independent of the thread count) whose partial sums are added in
// order: the same input gives the same bits with any number of threads.
constexpr int64_t kChunk = 4096;

template <typename acc_t>
inline acc_t raw_log_alpha(acc_t w, acc_t ls2) {
  return ls2 - std::log(w * w + acc_t(kEps));
}

template <typename acc_t>
inline acc_t kl_of(acc_t la) {
  // KL = k1 − k1·sigmoid(k2 + k3·la) + ½·softplus(−la); softplus written stably.
  const acc_t t = acc_t(kK2) + acc_t(kK3) * la;
  const acc_t sig = acc_t(1) / (acc_t(1) + std::exp(-t));
  const acc_t softplus_neg = std::max(-la, acc_t(0)) + std::log1p(std::exp(-std::abs(la)));
  return acc_t(kK1) * (acc_t(1) - sig) + acc_t(0.5) * softplus_neg;
}

void check_params(const at::Tensor& weight, const at::Tensor& log_sigma2, const char* op) {
  TORCH_CHECK(weight.sizes() == log_sigma2.sizes(), op,
              ": weight and log_sigma2 must have the same shape, got ", weight.sizes(),
              " and ", log_sigma2.sizes());
  TORCH_CHECK(weight.scalar_type() == log_sigma2.scalar_type(), op,
              ": weight and log_sigma2 must have the same dtype, got ", weight.scalar_type(),
              " and ", log_sigma2.scalar_type());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op,
              ": expected floating-point parameters, got ", weight.scalar_type());
}

at::Tensor kl_divergence_cpu(const at::Tensor& weight, const at::Tensor& log_sigma2,
                             double lo, double hi) {
  check_params(weight, log_sigma2, "kl_divergence");
  const auto w = weight.contiguous();
  const auto s = log_sigma2.contiguous();
  const int64_t n = w.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(std::max<int64_t>(chunks, 1), 0.0);
  const auto out_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "kl_divergence_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t end = std::min(n, (c + 1) * kChunk);
        acc_t sum = 0;
        for (int64_t i = c * kChunk; i < end; ++i) {
          acc_t la = raw_log_alpha<acc_t>(acc_t(wp[i]), acc_t(sp[i]));
          la = std::min(std::max(la, acc_t(lo)), acc_t(hi));
          sum += kl_of(la);
        }
        partial[c] = double(sum);
      }
    });
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return at::scalar_tensor(total, at::TensorOptions().dtype(out_dtype));
}

std::tuple<at::Tensor, at::Tensor> kl_divergence_backward_cpu(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& log_sigma2, double lo,
    double hi) {
  check_params(weight, log_sigma2, "kl_divergence_backward");
  TORCH_CHECK(grad.numel() == 1, "kl_divergence_backward: grad must hold one element, got ",
              grad.sizes());
  const auto w = weight.contiguous();
  const auto s = log_sigma2.contiguous();
  auto dw = at::empty_like(w);
  auto ds = at::empty_like(s);
  const int64_t n = w.numel();
  const double g = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "kl_divergence_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* dwp = dw.mutable_data_ptr<scalar_t>();
    scalar_t* dsp = ds.mutable_data_ptr<scalar_t>();
    const acc_t ga = acc_t(g);
    at::parallel_for(0, n, kChunk, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t wi = acc_t(wp[i]);
        const acc_t denom = wi * wi + acc_t(kEps);
        const acc_t la = acc_t(sp[i]) - std::log(denom);
        // torch.clamp passes the gradient on the closed interval [lo, hi].
        acc_t dla = 0;
        if (la >= acc_t(lo) && la <= acc_t(hi)) {
          const acc_t sig = acc_t(1) / (acc_t(1) + std::exp(-(acc_t(kK2) + acc_t(kK3) * la)));
          const acc_t sig_neg = acc_t(1) / (acc_t(1) + std::exp(la));
          dla = ga * (-acc_t(kK1 * kK3) * sig * (acc_t(1) - sig) - acc_t(0.5) * sig_neg);
        }
        dsp[i] = scalar_t(dla);
        dwp[i] = scalar_t(dla * acc_t(-2) * wi / denom);
      }
    });
  });
  return {dw, ds};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsevd, CPU, m) {
  m.impl("kl_divergence", &kl_divergence_cpu);
  m.impl("kl_divergence_backward", &kl_divergence_backward_cpu);
}

}  // namespace sparsevd
