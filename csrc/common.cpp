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

namespace {

void check_pf(const at::Tensor& x, at::TensorList ys, const at::Tensor& weights, at::IntArrayRef pf,
              bool weights_in_order = true) {
  TORCH_CHECK(is_float_type(x.scalar_type()),
              "mixed_op_pf: x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, "mixed_op_pf: x must be 3-D (C, H, W) or 4-D (B, C, H, W), got ",
              x.dim(), "-D with shape ", x.sizes());
  // As PyTorch's pools: an empty batch is fine, an empty plane is not.
  TORCH_CHECK(x.size(-1) > 0 && x.size(-2) > 0, "mixed_op_pf: x has an empty plane (H, W) = (", x.size(-2),
              ", ", x.size(-1), "); H and W must be at least 1");
  const int64_t K = static_cast<int64_t>(ys.size());
  const int64_t P = static_cast<int64_t>(pf.size());
  TORCH_CHECK(K + P >= 1, "mixed_op_pf: no candidates (ys and pf are both empty)");
  TORCH_CHECK(K <= kMaxK, "mixed_op_pf: at most ", kMaxK, " candidate outputs are supported, got ", K);
  bool seen[kMaxPf + 1] = {};
  for (int64_t j = 0; j < P; ++j) {
    TORCH_CHECK(pf[j] >= kPfSkip && pf[j] <= kPfMaxPool, "mixed_op_pf: pf[", j, "] = ", pf[j],
                " is not a parameter-free op code (1 = skip_connect, 2 = avg_pool_3x3, 3 = max_pool_3x3)");
    TORCH_CHECK(!seen[pf[j]], "mixed_op_pf: pf code ", pf[j], " appears twice in pf = ", pf);
    seen[pf[j]] = true;
  }
  // Stride 1 only: every candidate output has the input's shape.
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(ys[k].sizes() == x.sizes(), "mixed_op_pf: ys[", k, "] has shape ", ys[k].sizes(),
                " but x has shape ", x.sizes(), " (only stride-1 edges are supported)");
    TORCH_CHECK(ys[k].scalar_type() == x.scalar_type(), "mixed_op_pf: ys[", k, "] has dtype ",
                ys[k].scalar_type(), " but x has dtype ", x.scalar_type());
    TORCH_CHECK(ys[k].device() == x.device(), "mixed_op_pf: ys[", k, "] is on ", ys[k].device(),
                " but x is on ", x.device());
  }
  TORCH_CHECK(weights.dim() == 1, "mixed_op_pf: weights must be 1-D, got ", weights.dim(), "-D with shape ",
              weights.sizes());
  TORCH_CHECK(!weights_in_order || weights.size(0) == K + P, "mixed_op_pf: weights has length ", weights.size(0), " but there are ",
              K, " candidate outputs in ys and ", P, " parameter-free ops in pf");
  TORCH_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == x.scalar_type(),
              "mixed_op_pf: weights must be float32 or the x dtype (", x.scalar_type(), "), got ",
              weights.scalar_type());
  TORCH_CHECK(weights.device() == x.device(), "mixed_op_pf: weights are on ", weights.device(),
              " but x is on ", x.device());
}

// Channels_last when x and every y already are (no copies, and the pooling windows then
// read whole pixels of C contiguous values), else contiguous: any other layout is copied.
// gaea_ext/ops.py's fakes mirror this choice.
at::MemoryFormat pf_format(const at::Tensor& x, at::TensorList ys) {
  std::vector<at::Tensor> all{x};
  all.insert(all.end(), ys.begin(), ys.end());
  return common_format(all);
}

PfGeometry pf_geometry(const at::Tensor& x, at::MemoryFormat fmt) {
  PfGeometry g;
  g.H = x.size(-2);
  g.W = x.size(-1);
  const int64_t pixels = g.H * g.W;
  if (fmt == at::MemoryFormat::ChannelsLast) {
    g.images = x.size(0);
    g.P = x.size(1);
  } else {
    g.images = pixels == 0 ? 0 : x.numel() / pixels;
    g.P = 1;
  }
  return g;
}

}  // namespace

PfForward prepare_pf_forward(const at::Tensor& x, at::TensorList ys_in, const at::Tensor& weights,
                             at::IntArrayRef pf) {
  check_pf(x, ys_in, weights, pf);
  const auto fmt = pf_format(x, ys_in);
  PfForward f;
  f.x = x.contiguous(fmt);
  f.ys = dense_in(ys_in, fmt);
  f.w = acc_weights(weights, x.scalar_type());
  f.out = at::empty(x.sizes(), x.options().memory_format(fmt));
  f.pf = pf.vec();
  f.geo = pf_geometry(x, fmt);
  return f;
}

PfBackward prepare_pf_backward(const at::Tensor& grad, const at::Tensor& x, at::TensorList ys_in,
                               const at::Tensor& weights, at::IntArrayRef pf,
                               const c10::List<bool>& ys_mask, bool x_grad) {
  check_pf(x, ys_in, weights, pf);
  const size_t K = ys_in.size();
  TORCH_CHECK(ys_mask.size() == K, "mixed_op_pf_backward: ys_mask has ", ys_mask.size(), " entries for ", K,
              " inputs");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "mixed_op_pf_backward: grad must match x in shape, dtype and device");
  const auto fmt = pf_format(x, ys_in);
  PfBackward b;
  b.x = x.contiguous(fmt);
  b.ys = dense_in(ys_in, fmt);
  b.w = acc_weights(weights, x.scalar_type());
  b.grad = grad.contiguous(fmt);
  b.pf = pf.vec();
  b.geo = pf_geometry(x, fmt);
  const auto opts = x.options().memory_format(fmt);
  for (size_t k = 0; k < K; ++k)
    if (ys_mask.get(k)) b.grad_ys.push_back(at::empty(x.sizes(), opts));
  // grad_x is only the parameter-free part of x's gradient; with no pf ops (or x_grad=False)
  // there is none, and an empty tensor stands in for it.
  b.grad_x = (x_grad && !pf.empty()) ? at::empty(x.sizes(), opts) : at::empty({0}, x.options());
  return b;
}

// ---- mixed_op_bn -----------------------------------------------------------------------

namespace {

// Devices first, so a tensor on the wrong device gets this message, not a device guard's.
void check_bn_devices(const char* op, const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                      const at::Tensor& weights, bool uses_x) {
  const auto dev = zs[0].device();
  if (uses_x) TORCH_CHECK(x.device() == dev, op, ": x is on ", x.device(), " but zs[0] is on ", dev);
  for (size_t k = 0; k < ys.size(); ++k)
    TORCH_CHECK(ys[k].device() == dev, op, ": ys[", k, "] is on ", ys[k].device(), " but zs[0] is on ", dev);
  for (size_t j = 0; j < zs.size(); ++j)
    TORCH_CHECK(zs[j].device() == dev, op, ": zs[", j, "] is on ", zs[j].device(), " but zs[0] is on ", dev);
  TORCH_CHECK(weights.device() == dev, op, ": weights are on ", weights.device(), " but zs[0] is on ", dev);
}

void check_bn(const at::Tensor& x, at::TensorList ys, at::TensorList zs, const at::Tensor& weights,
              at::IntArrayRef pf, at::IntArrayRef w_index) {
  TORCH_CHECK(!zs.empty(), "mixed_op_bn: zs is empty (use mixed_op / mixed_op_pf)");
  check_bn_devices("mixed_op_bn", x, ys, zs, weights, !pf.empty());
  const at::Tensor& z0 = zs[0];
  TORCH_CHECK(z0.dim() == 3 || z0.dim() == 4, "mixed_op_bn: zs must be 3-D (N, C, L) or 4-D (N, C, H, W), got ",
              z0.dim(), "-D with shape ", z0.sizes());
  TORCH_CHECK(is_float_type(z0.scalar_type()), "mixed_op_bn: zs must be float32, float64, float16 or bfloat16, got ",
              z0.scalar_type());
  const int64_t K = static_cast<int64_t>(ys.size()), Z = static_cast<int64_t>(zs.size());
  TORCH_CHECK(K + Z <= kMaxK, "mixed_op_bn: at most ", kMaxK, " ys and zs together are supported, got ", K + Z);
  for (const at::TensorList list : {ys, zs}) {
    const char* name = list.data() == zs.data() ? "zs" : "ys";
    for (size_t k = 0; k < list.size(); ++k) {
      TORCH_CHECK(list[k].sizes() == z0.sizes(), "mixed_op_bn: ", name, "[", k, "] has shape ", list[k].sizes(),
                  " but zs[0] has shape ", z0.sizes());
      TORCH_CHECK(list[k].scalar_type() == z0.scalar_type(), "mixed_op_bn: ", name, "[", k, "] has dtype ",
                  list[k].scalar_type(), " but zs[0] has dtype ", z0.scalar_type());
    }
  }
  if (!pf.empty()) {
    std::vector<at::Tensor> all(ys.begin(), ys.end());
    all.insert(all.end(), zs.begin(), zs.end());
    check_pf(x, all, weights, pf, w_index.empty());  // shapes, codes, weights
  }
  const int64_t n = K + Z + static_cast<int64_t>(pf.size());
  if (!w_index.empty()) {
    TORCH_CHECK(weights.dim() == 1, "mixed_op_bn: weights must be 1-D, got shape ", weights.sizes());
    TORCH_CHECK(static_cast<int64_t>(w_index.size()) == n, "mixed_op_bn: w_index has ", w_index.size(),
                " entries for ", n, " candidates");
    for (int64_t i : w_index)
      TORCH_CHECK(i >= 0 && i < weights.size(0), "mixed_op_bn: w_index entry ", i, " is outside weights (length ",
                  weights.size(0), ")");
  }
  if (!pf.empty()) return;
  TORCH_CHECK(weights.dim() == 1 && (!w_index.empty() || weights.size(0) == K + Z), "mixed_op_bn: weights must be 1-D of length ",
              K + Z, " (", K, " ys, ", Z, " zs), got shape ", weights.sizes());
  TORCH_CHECK(weights.scalar_type() == at::kFloat || weights.scalar_type() == z0.scalar_type(),
              "mixed_op_bn: weights must be float32 or the zs dtype (", z0.scalar_type(), "), got ",
              weights.scalar_type());
}

at::MemoryFormat bn_format(const at::Tensor& x, at::TensorList ys, at::TensorList zs, bool uses_x) {
  std::vector<at::Tensor> all;
  if (uses_x) all.push_back(x);
  all.insert(all.end(), ys.begin(), ys.end());
  all.insert(all.end(), zs.begin(), zs.end());
  return common_format(all);
}

std::vector<int64_t> candidate_index(at::IntArrayRef w_index, size_t n) {
  if (!w_index.empty()) return w_index.vec();
  std::vector<int64_t> idx(n);
  for (size_t i = 0; i < n; ++i) idx[i] = static_cast<int64_t>(i);
  return idx;
}

BnChannels bn_channels(const at::Tensor& z, at::MemoryFormat fmt) {
  BnChannels c;
  c.C = z.size(1);
  for (int64_t d = 2; d < z.dim(); ++d) c.S *= z.size(d);
  c.M = z.size(0) * c.S;
  c.cl = fmt == at::MemoryFormat::ChannelsLast;
  return c;
}

// Everything but the direction-specific tensors; the inputs are already checked.
void dense_bn_inputs(BnInputs& in, const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                     const at::Tensor& weights, at::IntArrayRef pf, at::IntArrayRef w_index) {
  const bool uses_x = !pf.empty();
  const at::Tensor& z0 = zs[0];
  in.fmt = bn_format(x, ys, zs, uses_x);
  if (uses_x) in.x = x.contiguous(in.fmt);
  in.ys = dense_in(ys, in.fmt);
  in.zs = dense_in(zs, in.fmt);
  in.w = acc_weights(weights, z0.scalar_type());
  in.pf = pf.vec();
  in.widx = candidate_index(w_index, ys.size() + zs.size() + pf.size());
  in.geo = pf_geometry(uses_x ? x : z0, in.fmt);
  in.ch = bn_channels(z0, in.fmt);
}

}  // namespace

BnForward prepare_bn_forward(const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                             const at::Tensor& weights, at::IntArrayRef pf, at::TensorList running_means,
                             at::TensorList running_vars, at::TensorList batches_tracked,
                             at::IntArrayRef w_index) {
  check_bn(x, ys, zs, weights, pf, w_index);
  const int64_t Z = static_cast<int64_t>(zs.size());
  TORCH_CHECK(running_means.size() == running_vars.size() &&
                  (running_means.empty() || static_cast<int64_t>(running_means.size()) == Z),
              "mixed_op_bn: give running_means and running_vars for every z, or none");
  TORCH_CHECK(batches_tracked.empty() || static_cast<int64_t>(batches_tracked.size()) == Z,
              "mixed_op_bn: give batches_tracked for every z, or none");
  const at::Tensor& z0 = zs[0];
  const int64_t C = z0.size(1);
  for (size_t j = 0; j < running_means.size(); ++j)
    for (const at::Tensor& r : {running_means[j], running_vars[j]}) {
      TORCH_CHECK(r.device() == z0.device(), "mixed_op_bn: running stats are on ", r.device(), " but zs[0] is on ",
                  z0.device());
      TORCH_CHECK(r.dim() == 1 && r.size(0) == C, "mixed_op_bn: running stats must have shape [", C, "], got ",
                  r.sizes());
      TORCH_CHECK(r.scalar_type() == acc_type(z0.scalar_type()) || r.scalar_type() == z0.scalar_type(),
                  "mixed_op_bn: running stats must be ", acc_type(z0.scalar_type()), " or the zs dtype, got ",
                  r.scalar_type());
      TORCH_CHECK(r.is_contiguous(), "mixed_op_bn: running stats must be contiguous");
    }
  for (const at::Tensor& n : batches_tracked)
    TORCH_CHECK(n.device() == z0.device() && n.scalar_type() == at::kLong && n.numel() == 1,
                "mixed_op_bn: batches_tracked must be one-element int64 tensors on zs' device");
  TORCH_CHECK(z0.numel() > 0, "mixed_op_bn: zs are empty tensors; batch norm needs at least one value per channel");
  BnForward f;
  dense_bn_inputs(f, x, ys, zs, weights, pf, w_index);
  f.out = at::empty(z0.sizes(), z0.options().memory_format(f.fmt));
  f.stats = at::empty({Z, 2, C}, z0.options().dtype(acc_type(z0.scalar_type())));
  return f;
}

BnBackward prepare_bn_backward(const at::Tensor& grad, const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                               const at::Tensor& weights, at::IntArrayRef pf, const at::Tensor& stats,
                               const c10::List<bool>& ys_mask, const c10::List<bool>& zs_mask, bool x_grad,
                               at::IntArrayRef w_index) {
  check_bn(x, ys, zs, weights, pf, w_index);
  const at::Tensor& z0 = zs[0];
  TORCH_CHECK(ys_mask.size() == ys.size() && zs_mask.size() == zs.size(),
              "mixed_op_bn_backward: ys_mask / zs_mask must have one entry per ys / zs");
  TORCH_CHECK(grad.sizes() == z0.sizes() && grad.scalar_type() == z0.scalar_type() && grad.device() == z0.device(),
              "mixed_op_bn_backward: grad must match zs in shape, dtype and device");
  const int64_t Z = static_cast<int64_t>(zs.size());
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == Z && stats.size(1) == 2 && stats.size(2) == z0.size(1) &&
                  stats.scalar_type() == acc_type(z0.scalar_type()) && stats.device() == z0.device(),
              "mixed_op_bn_backward: stats must be [Z, 2, C] in the accumulation type, as mixed_op_bn returns it");
  BnBackward b;
  dense_bn_inputs(b, x, ys, zs, weights, pf, w_index);
  b.grad = grad.contiguous(b.fmt);
  b.stats = stats.contiguous();
  const auto opts = z0.options().memory_format(b.fmt);
  for (size_t k = 0; k < ys.size(); ++k)
    if (ys_mask.get(k)) b.grad_ys.push_back(at::empty(z0.sizes(), opts));
  for (size_t j = 0; j < zs.size(); ++j)
    if (zs_mask.get(j)) b.grad_zs.push_back(at::empty(z0.sizes(), opts));
  b.grad_x = (x_grad && !pf.empty()) ? at::empty(x.sizes(), opts) : at::empty({0}, z0.options());
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
