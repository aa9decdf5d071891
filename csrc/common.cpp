#include "common.h"

namespace gaea {
namespace {

void check_mixed_op(at::TensorList ys, const at::Tensor& weights) {
  TORCH_CHECK(!ys.empty(), "mixed_op: ys is an empty list; need at least one candidate output");
  const int64_t K = static_cast<int64_t>(ys.size());
  TORCH_CHECK(K <= kMaxK, "mixed_op: at most ", kMaxK, " candidates are supported, got ", K);
  const at::Tensor& y0 = ys[0];
  TORCH_CHECK(is_float_type(y0.scalar_type()),
              "mixed_op: ys must be float32, float64, float16 or bfloat16, got ",
              y0.scalar_type());
  for (int64_t k = 1; k < K; ++k) {
    TORCH_CHECK(ys[k].sizes() == y0.sizes(), "mixed_op: ys[", k, "] has shape ",
                ys[k].sizes(), " but ys[0] has shape ", y0.sizes());
    TORCH_CHECK(ys[k].scalar_type() == y0.scalar_type(), "mixed_op: ys[", k, "] has dtype ",
                ys[k].scalar_type(), " but ys[0] has dtype ", y0.scalar_type());
    TORCH_CHECK(ys[k].device() == y0.device(), "mixed_op: ys[", k, "] is on ", ys[k].device(),
                " but ys[0] is on ", y0.device());
  }
  TORCH_CHECK(weights.dim() == 1, "mixed_op: weights must be 1-D, got ", weights.dim(),
              "-D with shape ", weights.sizes());
  TORCH_CHECK(weights.size(0) == K, "mixed_op: weights has length ", weights.size(0),
              " but there are ", K, " candidate outputs in ys");
  TORCH_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == y0.scalar_type(),
              "mixed_op: weights must be float32 or the ys dtype (", y0.scalar_type(),
              "), got ", weights.scalar_type());
  TORCH_CHECK(weights.device() == y0.device(), "mixed_op: weights are on ", weights.device(),
              " but ys are on ", y0.device());
}

// The one layout all ys are dense in, so channels_last activations are never transposed.
// gaea_ext/ops.py's fake kernels mirror this choice.
at::MemoryFormat common_format(at::TensorList ys) {
  const int64_t dim = ys[0].dim();
  at::MemoryFormat candidates[] = {
      at::MemoryFormat::Contiguous,
      dim == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous,
      dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous};
  for (auto fmt : candidates) {
    bool all = true;
    for (const auto& y : ys) all = all && y.is_contiguous(fmt);
    if (all) return fmt;
  }
  return at::MemoryFormat::Contiguous;
}

std::vector<at::Tensor> dense_in(at::TensorList ys, at::MemoryFormat fmt) {
  std::vector<at::Tensor> out;
  out.reserve(ys.size());
  for (const auto& y : ys) out.push_back(y.contiguous(fmt));
  return out;
}

at::Tensor acc_weights(const at::Tensor& weights, at::ScalarType ys_type) {
  return weights.to(acc_type(ys_type)).contiguous();
}

}  // namespace

MixedForward prepare_forward(at::TensorList ys_in, const at::Tensor& weights) {
  check_mixed_op(ys_in, weights);
  const auto fmt = common_format(ys_in);
  MixedForward f;
  f.ys = dense_in(ys_in, fmt);
  f.w = acc_weights(weights, ys_in[0].scalar_type());
  f.out = at::empty(ys_in[0].sizes(), ys_in[0].options().memory_format(fmt));
  return f;
}

MixedBackward prepare_backward(const at::Tensor& grad, at::TensorList ys_in, const at::Tensor& weights,
                               const c10::List<bool>& ys_mask) {
  check_mixed_op(ys_in, weights);
  const size_t K = ys_in.size();
  TORCH_CHECK(ys_mask.size() == K, "mixed_op_backward: ys_mask has ", ys_mask.size(),
              " entries for ", K, " inputs");
  TORCH_CHECK(grad.sizes() == ys_in[0].sizes() && grad.scalar_type() == ys_in[0].scalar_type() &&
                  grad.device() == ys_in[0].device(),
              "mixed_op_backward: grad must match ys in shape, dtype and device");
  const auto fmt = common_format(ys_in);
  MixedBackward b;
  b.ys = dense_in(ys_in, fmt);
  b.w = acc_weights(weights, ys_in[0].scalar_type());
  b.grad = grad.contiguous(fmt);
  const auto opts = ys_in[0].options().memory_format(fmt);
  for (size_t k = 0; k < K; ++k)
    if (ys_mask.get(k)) b.grad_ys.push_back(at::empty(ys_in[0].sizes(), opts));
  return b;
}

void check_eg_update(at::TensorList params, at::TensorList grads,
                     const c10::optional<at::Tensor>& lr_tensor, double eps) {
  TORCH_CHECK(!params.empty(), "eg_update_: params is an empty list");
  TORCH_CHECK(params.size() == grads.size(), "eg_update_: got ", params.size(),
              " params but ", grads.size(), " grads");
  TORCH_CHECK(eps >= 0, "eg_update_: eps must be >= 0, got ", eps);
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    const auto& g = grads[i];
    TORCH_CHECK(is_float_type(p.scalar_type()), "eg_update_: params[", i,
                "] must be a float tensor, got ", p.scalar_type());
    TORCH_CHECK(p.dim() >= 1, "eg_update_: params[", i,
                "] is 0-d; the simplex is its last dimension, so it needs at least 1-D");
    TORCH_CHECK(g.sizes() == p.sizes(), "eg_update_: grads[", i, "] has shape ", g.sizes(),
                " but params[", i, "] has shape ", p.sizes());
    TORCH_CHECK(g.scalar_type() == p.scalar_type(), "eg_update_: grads[", i, "] has dtype ",
                g.scalar_type(), " but params[", i, "] has dtype ", p.scalar_type());
    TORCH_CHECK(p.device() == params[0].device() && g.device() == p.device(),
                "eg_update_: params[", i, "] (", p.device(), ") and grads[", i, "] (",
                g.device(), ") must be on the same device as params[0] (", params[0].device(),
                ")");
  }
  if (lr_tensor.has_value()) {
    const auto& lr = *lr_tensor;
    TORCH_CHECK(lr.numel() == 1, "eg_update_: lr tensor must hold one value, got shape ",
                lr.sizes());
    TORCH_CHECK(is_float_type(lr.scalar_type()), "eg_update_: lr tensor must be a float tensor, got ",
                lr.scalar_type());
    TORCH_CHECK(lr.device() == params[0].device() || lr.device().is_cpu(),
                "eg_update_: lr tensor is on ", lr.device(), " but params are on ",
                params[0].device());
  }
}

}  // namespace gaea
