// CPU exponentiated-gradient step. Per row of length L it reads p and g once and writes p
// once (3L elements) with one log and one exp per entry, so it is latency bound for the
// tiny architecture tensors NAS uses; the win over eager is doing all params in one call.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>

#include "../common.h"
#include "../ops.h"

namespace gaea {
namespace {

// p <- normalize(max(p * exp(-lr g), eps)), evaluated as a softmax of
// max(log p - lr g, log eps) with the row max subtracted, so |lr g| of 1e4 cannot overflow.
// Returns false, leaving the row untouched, when the step is not defined (non-finite grad,
// NaN or infinite param, or an all-zero row with eps == 0).
template <typename scalar_t, typename acc_t>
bool eg_row(scalar_t* p, const scalar_t* g, int64_t L, acc_t lr, acc_t log_eps, acc_t* l) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  acc_t m = -inf;
  for (int64_t i = 0; i < L; ++i) {
    const acc_t gi = static_cast<acc_t>(g[i]);
    if (!std::isfinite(gi)) return false;
    const acc_t raw = std::log(static_cast<acc_t>(p[i])) - lr * gi;
    if (!(raw < inf)) return false;  // NaN (NaN or negative p) or +inf
    const acc_t li = std::max(raw, log_eps);
    l[i] = li;
    m = std::max(m, li);
  }
  if (m == -inf) return false;
  acc_t s = 0;
  for (int64_t i = 0; i < L; ++i) {
    l[i] = std::exp(l[i] - m);
    s += l[i];
  }
  for (int64_t i = 0; i < L; ++i) p[i] = static_cast<scalar_t>(l[i] / s);
  return true;
}

template <typename scalar_t>
int64_t eg_tensor(at::Tensor& p, const at::Tensor& g, double lr, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = p.size(-1);
  if (p.numel() == 0 || L == 0) return 0;
  const int64_t rows = p.numel() / L;
  const acc_t log_eps = eps > 0 ? std::log(static_cast<acc_t>(eps))
                                : -std::numeric_limits<acc_t>::infinity();
  scalar_t* pd = p.mutable_data_ptr<scalar_t>();
  const scalar_t* gd = g.const_data_ptr<scalar_t>();
  std::atomic<int64_t> skipped{0};
  // Grain keeps the tiny NAS tensors on one thread; big ones still split across cores.
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / L), [&](int64_t b, int64_t e) {
    std::vector<acc_t> scratch(L);
    int64_t bad = 0;
    for (int64_t r = b; r < e; ++r)
      bad += !eg_row<scalar_t, acc_t>(pd + r * L, gd + r * L, L, static_cast<acc_t>(lr), log_eps,
                                      scratch.data());
    skipped += bad;
  });
  return skipped.load();
}

// Rows (last dimension) in all params: what a step with a non-finite lr tensor skips.
int64_t eg_rows(at::TensorList params) {
  int64_t rows = 0;
  for (const auto& p : params)
    if (p.numel() > 0) rows += p.numel() / p.size(-1);
  return rows;
}

}  // namespace

at::Tensor eg_update_cpu(at::TensorList params, at::TensorList grads, double lr,
                         const c10::optional<at::Tensor>& lr_tensor, double eps) {
  check_eg_update(params, grads, lr_tensor, eps);
  if (lr_tensor.has_value()) {
    lr = lr_tensor->item<double>();
    // As on CUDA, where the value is only read on the device: a non-finite lr tensor leaves
    // every row unchanged and counts it (a float lr is checked on the host below).
    if (!std::isfinite(lr)) return at::scalar_tensor(eg_rows(params), at::kLong);
  }
  TORCH_CHECK(std::isfinite(lr), "eg_update_: lr must be finite, got ", lr);
  int64_t skipped = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i].contiguous();  // a copy only for a non-contiguous param
    const at::Tensor g = grads[i].contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "eg_update_cpu", [&] {
      skipped += eg_tensor<scalar_t>(p, g, lr, eps);
    });
    if (!p.is_same(params[i])) params[i].copy_(p);
  }
  return at::scalar_tensor(skipped, at::kLong);
}

TORCH_LIBRARY_IMPL(gaea, CPU, m) { m.impl("eg_update_", &eg_update_cpu); }

}  // namespace gaea
