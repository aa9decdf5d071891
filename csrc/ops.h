// Backend entry points. CPU and CUDA twins share signatures; ops.cpp owns the schemas.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace gaea {

at::Tensor mixed_op_cpu(at::TensorList ys, const at::Tensor& weights);
std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_backward_cpu(
    const at::Tensor& grad, at::TensorList ys, const at::Tensor& weights,
    const c10::List<bool>& ys_mask, bool weights_grad);
at::Tensor mixed_op_pf_cpu(const at::Tensor& x, at::TensorList ys, const at::Tensor& weights,
                           at::IntArrayRef pf);
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> mixed_op_pf_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, at::TensorList ys, const at::Tensor& weights,
    at::IntArrayRef pf, const c10::List<bool>& ys_mask, bool x_grad, bool weights_grad);
std::tuple<at::Tensor, at::Tensor> mixed_op_bn_cpu(const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                                                   const at::Tensor& weights, at::IntArrayRef pf,
                                                   at::TensorList running_means, at::TensorList running_vars,
                                                   at::TensorList batches_tracked, c10::optional<double> momentum,
                                                   double eps, at::IntArrayRef w_index);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> mixed_op_bn_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, at::TensorList ys, at::TensorList zs, const at::Tensor& weights,
    at::IntArrayRef pf, const at::Tensor& stats, const c10::List<bool>& ys_mask, const c10::List<bool>& zs_mask,
    bool x_grad, bool weights_grad, at::IntArrayRef w_index);
at::Tensor eg_update_cpu(at::TensorList params, at::TensorList grads, double lr,
                         const c10::optional<at::Tensor>& lr_tensor, double eps);

}  // namespace gaea

#ifdef GAEA_WITH_CUDA
namespace gaea {
at::Tensor mixed_op_cuda(at::TensorList ys, const at::Tensor& weights);
std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_backward_cuda(
    const at::Tensor& grad, at::TensorList ys, const at::Tensor& weights,
    const c10::List<bool>& ys_mask, bool weights_grad);
at::Tensor mixed_op_pf_cuda(const at::Tensor& x, at::TensorList ys, const at::Tensor& weights,
                            at::IntArrayRef pf);
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> mixed_op_pf_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, at::TensorList ys, const at::Tensor& weights,
    at::IntArrayRef pf, const c10::List<bool>& ys_mask, bool x_grad, bool weights_grad);
std::tuple<at::Tensor, at::Tensor> mixed_op_bn_cuda(const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                                                    const at::Tensor& weights, at::IntArrayRef pf,
                                                    at::TensorList running_means, at::TensorList running_vars,
                                                    at::TensorList batches_tracked, c10::optional<double> momentum,
                                                    double eps, at::IntArrayRef w_index);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> mixed_op_bn_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, at::TensorList ys, at::TensorList zs, const at::Tensor& weights,
    at::IntArrayRef pf, const at::Tensor& stats, const c10::List<bool>& ys_mask, const c10::List<bool>& zs_mask,
    bool x_grad, bool weights_grad, at::IntArrayRef w_index);
at::Tensor eg_update_cuda(at::TensorList params, at::TensorList grads, double lr,
                          const c10::optional<at::Tensor>& lr_tensor, double eps);
}  // namespace gaea
#endif
