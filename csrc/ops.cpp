// Every gaea operator schema, in one place. Kernels register themselves per backend in
// cpu/*.cpp and cuda/*.cu; fake (meta) kernels and autograd live in gaea_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(gaea, m) {
  // out = sum_k weights[k] * ys[k]; the inputs are never stacked.
  m.def("mixed_op(Tensor[] ys, Tensor weights) -> Tensor");
  // One pass: grad_ys[k] = weights[k] * grad for k with ys_mask[k] (only those are
  // returned, in order), grad_weights[k] = sum(grad * ys[k]) accumulated deterministically.
  // weights_grad=False skips the K dot products (and reading ys): grad_weights is then zero.
  m.def(
      "mixed_op_backward(Tensor grad, Tensor[] ys, Tensor weights, bool[] ys_mask,"
      " bool weights_grad=True) -> (Tensor[], Tensor)");
  // The same mixture when some candidates are parameter-free ops of the edge input x:
  // out = sum_k weights[k] * ys[k] + sum_j weights[len(ys) + j] * pf_j(x), pf codes 1 =
  // skip_connect, 2 = avg_pool_3x3 (stride 1, pad 1, count_include_pad=False), 3 =
  // max_pool_3x3 (stride 1, pad 1). pf_j(x) is computed on the fly and never written to
  // memory, so autograd saves x once instead of one pooled copy per pool.
  m.def("mixed_op_pf(Tensor x, Tensor[] ys, Tensor weights, int[] pf) -> Tensor");
  // grad_ys as mixed_op_backward; grad_x = the parameter-free candidates' part of x's
  // gradient only (autograd adds the rest), an empty tensor unless x_grad and pf is not
  // empty; grad_weights[j] = sum(grad * candidate j), pooled candidates recomputed from x.
  m.def(
      "mixed_op_pf_backward(Tensor grad, Tensor x, Tensor[] ys, Tensor weights, int[] pf,"
      " bool[] ys_mask, bool x_grad=True, bool weights_grad=True) -> (Tensor[], Tensor, Tensor)");
  // The mixture when some candidates end in BatchNorm(affine=False), train mode: out =
  // sum_k w[k] ys[k] + sum_j w[K + j] BN(zs[j]) + sum_p w[K + Z + p] pf_p(x). Batch statistics
  // over all dims but 1; stats = [Z, 2, C] (mean, 1/sqrt(var + eps)) in the accumulation type,
  // which is all backward needs besides zs (the normalized outputs are never written). When
  // running stats are given (one pair per z) they are updated in place as nn.BatchNorm2d does
  // (unbiased variance) with factor `momentum`, or with 1/num_batches_tracked when momentum
  // is None; batches_tracked (0-d int64, one per z, or empty) is incremented in place first.
  // x is read only for pf (then every y and z has x's shape); with pf empty the edge may
  // change shape (stride 2) and x is ignored. w_index: the weights entry of each candidate
  // (ys, zs, pf order), so an edge passes its whole row of architecture weights (`none`
  // included) without a gather; empty means weights are in candidate order.
  m.def(
      "mixed_op_bn(Tensor x, Tensor[] ys, Tensor[] zs, Tensor weights, int[] pf,"
      " Tensor(a!)[] running_means, Tensor(b!)[] running_vars, Tensor(c!)[] batches_tracked,"
      " float? momentum, float eps, int[] w_index=[]) -> (Tensor, Tensor)");
  // One reduction pass (per channel: sum grad, sum grad * (z_j - mean_j)), one elementwise pass
  // writing grad_ys (where ys_mask), grad_zs (where zs_mask; the BN backward), the pf part of
  // grad_x (empty unless x_grad and pf) and grad_weights (weights' shape, zero where no
  // candidate reads an entry or unless weights_grad).
  m.def(
      "mixed_op_bn_backward(Tensor grad, Tensor x, Tensor[] ys, Tensor[] zs, Tensor weights,"
      " int[] pf, Tensor stats, bool[] ys_mask, bool[] zs_mask, bool x_grad, bool weights_grad,"
      " int[] w_index=[]) -> (Tensor[], Tensor[], Tensor, Tensor)");
  // Exponentiated-gradient step on every row of every param, in place. lr_tensor, when
  // given, overrides lr and is read on the device (CUDA-graph capturable). Returns the
  // number of rows left unchanged because their grad (or param) was not finite.
  m.def(
      "eg_update_(Tensor(a!)[] params, Tensor[] grads, float lr, Tensor? lr_tensor,"
      " float eps) -> Tensor");
}
