// CUDA exponentiated-gradient step: one warp per row, every param of one dtype in one launch.
// lr may live on the device, so the step needs no host sync and can be graph-captured.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <map>

#include "../common.h"
#include "../ops.h"
#include "multi_tensor.cuh"

namespace gaea {
namespace {

// Softmax of max(log p - lr g, log eps) over the row with the row max subtracted: equal to
// normalize(clamp(p * exp(-lr g), eps)) but immune to overflow. The row is recomputed from
// p and g in each pass instead of cached, since rows are short and stay in L1.
template <typename scalar_t>
struct EgRow {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* lr_dev;  // overrides lr when set
  acc_t lr;
  acc_t log_eps;
  unsigned long long* skipped;

  // Unclamped: a NaN here (NaN or negative p) must reach the caller, and fmax would hide it.
  __device__ __forceinline__ acc_t raw_logit(const scalar_t* p, const scalar_t* g, int64_t i,
                                             acc_t step) const {
    return log(static_cast<acc_t>(p[i])) - step * static_cast<acc_t>(g[i]);
  }
  __device__ __forceinline__ acc_t logit(const scalar_t* p, const scalar_t* g, int64_t i,
                                         acc_t step) const {
    return max(raw_logit(p, g, i, step), log_eps);
  }

  __device__ void operator()(scalar_t* p, const scalar_t* g, int64_t L, int lane) const {
    constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
    const acc_t step = lr_dev != nullptr ? *lr_dev : lr;
    bool bad = !isfinite(step);  // a non-finite lr tensor: every row is skipped and counted
    acc_t m = -inf;
    for (int64_t i = lane; i < L; i += kWarp) {
      const acc_t raw = raw_logit(p, g, i, step);
      bad = bad || !isfinite(static_cast<acc_t>(g[i])) || !(raw < inf);  // NaN fails `<`
      m = max(m, max(raw, log_eps));
    }
    bad = __any_sync(0xffffffffu, bad);
    m = warp_max(m);
    if (bad || m == -inf) {  // leave the row as it was, and say so
      if (lane == 0) atomicAdd(skipped, 1ULL);
      return;
    }
    acc_t s = 0;
    for (int64_t i = lane; i < L; i += kWarp) s += exp(logit(p, g, i, step) - m);
    s = warp_sum(s);
    for (int64_t i = lane; i < L; i += kWarp)
      p[i] = static_cast<scalar_t>(exp(logit(p, g, i, step) - m) / s);
  }
};

}  // namespace

at::Tensor eg_update_cuda(at::TensorList params, at::TensorList grads, double lr,
                          const c10::optional<at::Tensor>& lr_tensor, double eps) {
  check_eg_update(params, grads, lr_tensor, eps);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool lr_on_device = lr_tensor.has_value() && lr_tensor->is_cuda();
  if (lr_tensor.has_value() && !lr_on_device) {
    // A CPU lr is read here, once: a graph captured now would replay that value forever.
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "eg_update_: the lr tensor is on the CPU while a CUDA graph is being captured; its value "
                "would be frozen into the graph. Put the lr tensor on ", params[0].device(),
                " (or pass a float)");
    lr = lr_tensor->item<double>();  // CPU: no sync; a non-finite value skips every row below
  } else {
    TORCH_CHECK(std::isfinite(lr), "eg_update_: lr must be finite, got ", lr);
  }
  at::Tensor skipped = at::zeros({}, params[0].options().dtype(at::kLong));

  // Work on contiguous tensors; the rare strided param is updated through a copy.
  std::map<at::ScalarType, std::vector<size_t>> by_dtype;
  std::vector<at::Tensor> ps(params.size()), gs(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    ps[i] = params[i].contiguous();
    gs[i] = grads[i].contiguous();
    by_dtype[params[i].scalar_type()].push_back(i);
  }
  for (const auto& [dtype, idx] : by_dtype) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "eg_update_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      at::Tensor lr_acc;
      if (lr_on_device) lr_acc = lr_tensor->to(c10::CppTypeToScalarType<acc_t>::value);
      EgRow<scalar_t> op{lr_on_device ? lr_acc.const_data_ptr<acc_t>() : nullptr,
                         static_cast<acc_t>(lr),
                         eps > 0 ? static_cast<acc_t>(std::log(eps))
                                 : -std::numeric_limits<acc_t>::infinity(),
                         reinterpret_cast<unsigned long long*>(skipped.mutable_data_ptr<int64_t>())};
      std::vector<at::Tensor> p_sel, g_sel;
      for (size_t i : idx) {
        p_sel.push_back(ps[i]);
        g_sel.push_back(gs[i]);
      }
      apply_rows<scalar_t>(p_sel, g_sel, op);
    });
  }
  for (size_t i = 0; i < params.size(); ++i)
    if (ps[i].defined() && !ps[i].is_same(params[i])) params[i].copy_(ps[i]);
  return skipped;
}

TORCH_LIBRARY_IMPL(gaea, CUDA, m) { m.impl("eg_update_", &eg_update_cuda); }

}  // namespace gaea
