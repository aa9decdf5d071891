// C++ autograd for mixed_op_bn (as pytorch_scatter registers its hot ops): a call from Python
// is one dispatcher call, with no Python glue per edge. The forward and backward are the
// schema'd ops, redispatched below autograd, so fake tensors, torch.compile and opcheck see
// them as ordinary ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace gaea {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using BnForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList,
                                                       const at::Tensor&, at::IntArrayRef, at::TensorList,
                                                       at::TensorList, at::TensorList, c10::optional<double>, double,
                                                       at::IntArrayRef);
using BnBackwardFn = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&, at::IntArrayRef,
    const at::Tensor&, const c10::List<bool>&, const c10::List<bool>&, bool, bool, at::IntArrayRef);

// What the forward takes besides the differentiable tensors. Passed to Function::apply as one
// non-tensor argument, so the running statistics are not counted as autograd inputs.
struct BnExtra {
  at::IntArrayRef pf;
  at::TensorList running_means, running_vars, batches_tracked;
  c10::optional<double> momentum;
  double eps;
  at::IntArrayRef w_index;
};

class MixedOpBn : public torch::autograd::Function<MixedOpBn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                               const at::Tensor& weights, const BnExtra& e) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("gaea::mixed_op_bn", "").typed<BnForwardFn>();
    at::Tensor out, stats;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, stats) = op.call(x, ys, zs, weights, e.pf, e.running_means, e.running_vars,
                                     e.batches_tracked, e.momentum, e.eps, e.w_index);
    }
    // The running statistics changed in place (not through autograd): bump their versions, as
    // an in-place aten op would, so anything that saved them notices.
    for (at::TensorList list : {e.running_means, e.running_vars, e.batches_tracked})
      for (const at::Tensor& t : list) torch::autograd::impl::bump_version(t);
    ctx->mark_non_differentiable({stats});
    // stats never gets a gradient: don't let the engine allocate zeros for it every call.
    ctx->set_materialize_grads(false);
    // x only when a parameter-free candidate is recomputed from it; never a normalized output.
    variable_list saved;
    saved.reserve(ys.size() + zs.size() + 3);
    saved.push_back(e.pf.empty() ? at::Tensor() : x);
    saved.insert(saved.end(), ys.begin(), ys.end());
    saved.insert(saved.end(), zs.begin(), zs.end());
    saved.push_back(weights);
    saved.push_back(stats);
    ctx->save_for_backward(saved);
    ctx->saved_data["pf"] = e.pf.vec();
    ctx->saved_data["w_index"] = e.w_index.vec();
    ctx->saved_data["K"] = static_cast<int64_t>(ys.size());
    ctx->saved_data["Z"] = static_cast<int64_t>(zs.size());
    return {out, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "mixed_op_bn has no second derivative; run this with --no-fused "
                "(gaea_ext.reference.mixed_op_bn) to differentiate twice");
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("gaea::mixed_op_bn_backward", "").typed<BnBackwardFn>();
    const int64_t K = ctx->saved_data["K"].toInt(), Z = ctx->saved_data["Z"].toInt();
    const std::vector<int64_t> pf = ctx->saved_data["pf"].toIntVector();
    const std::vector<int64_t> w_index = ctx->saved_data["w_index"].toIntVector();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const std::vector<at::Tensor> ys(saved.begin() + 1, saved.begin() + 1 + K);
    const std::vector<at::Tensor> zs(saved.begin() + 1 + K, saved.begin() + 1 + K + Z);
    const at::Tensor& weights = saved[1 + K + Z];
    const at::Tensor& stats = saved[2 + K + Z];
    // One entry per forward argument, lists flattened: x, ys..., zs..., weights, extra (none).
    variable_list result(K + Z + 3);
    if (!grads[0].defined()) return result;
    c10::List<bool> ys_mask, zs_mask;
    for (int64_t k = 0; k < K; ++k) ys_mask.push_back(ctx->needs_input_grad(1 + k));
    for (int64_t j = 0; j < Z; ++j) zs_mask.push_back(ctx->needs_input_grad(1 + K + j));
    const bool x_grad = ctx->needs_input_grad(0) && !pf.empty();
    const bool w_grad = ctx->needs_input_grad(1 + K + Z);
    auto [grad_ys, grad_zs, grad_x, grad_w] =
        op.call(grads[0], x.defined() ? x : zs[0], ys, zs, weights, pf, stats, ys_mask, zs_mask, x_grad,
                w_grad, w_index);
    if (x_grad) result[0] = grad_x;
    for (int64_t k = 0, n = 0; k < K; ++k)
      if (ys_mask.get(k)) result[1 + k] = grad_ys[n++];
    for (int64_t j = 0, n = 0; j < Z; ++j)
      if (zs_mask.get(j)) result[1 + K + j] = grad_zs[n++];
    if (w_grad) result[1 + K + Z] = grad_w;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> mixed_op_bn_autograd(const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                                                        const at::Tensor& weights, at::IntArrayRef pf,
                                                        at::TensorList running_means, at::TensorList running_vars,
                                                        at::TensorList batches_tracked,
                                                        c10::optional<double> momentum, double eps,
                                                        at::IntArrayRef w_index) {
  const BnExtra extra{pf, running_means, running_vars, batches_tracked, momentum, eps, w_index};
  auto out = MixedOpBn::apply(x, ys, zs, weights, extra);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(gaea, Autograd, m) { m.impl("mixed_op_bn", &mixed_op_bn_autograd); }

}  // namespace gaea
