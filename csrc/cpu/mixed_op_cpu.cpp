// CPU mixed op. Bandwidth bound: forward moves (K+1)·N elements, backward (2K+1)·N at most;
// arithmetic is 2 FLOPs per element per candidate. Both walk tiles that stay in L1 while
// each candidate streams through them, so every input is read exactly once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "../ops.h"

namespace gaea {
namespace {

// Tile lengths are multiples of every SIMD width, so the inner loops vectorize cleanly.
constexpr int64_t kTile = 1024;
// The weight gradient is reduced over fixed chunks, never over per-thread ranges, so it is
// bitwise identical for any number of threads.
constexpr int64_t kChunk = 16 * kTile;
// Independent accumulators per candidate: lets the compiler vectorize the dot product
// without reassociating float additions (which would make it order-dependent).
constexpr int kLanes = 16;

template <typename scalar_t>
void forward_kernel(const std::vector<const scalar_t*>& ys,
                    const at::opmath_type<scalar_t>* w, scalar_t* out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const size_t K = ys.size();
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    acc_t buf[kTile];
    for (int64_t t = begin; t < end; t += kTile) {
      const int64_t m = std::min(kTile, end - t);
      const scalar_t* y0 = ys[0] + t;
      for (int64_t i = 0; i < m; ++i) buf[i] = w[0] * static_cast<acc_t>(y0[i]);
      for (size_t k = 1; k < K; ++k) {
        const scalar_t* yk = ys[k] + t;
        const acc_t wk = w[k];
        for (int64_t i = 0; i < m; ++i) buf[i] += wk * static_cast<acc_t>(yk[i]);
      }
      scalar_t* o = out + t;
      for (int64_t i = 0; i < m; ++i) o[i] = static_cast<scalar_t>(buf[i]);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* g, const std::vector<const scalar_t*>& ys,
                     const at::opmath_type<scalar_t>* w, const std::vector<scalar_t*>& gys,
                     at::opmath_type<scalar_t>* partials, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = static_cast<int64_t>(ys.size());
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
    acc_t gbuf[kTile];
    std::vector<acc_t> lanes(K * kLanes);
    for (int64_t c = cbegin; c < cend; ++c) {
      std::fill(lanes.begin(), lanes.end(), acc_t(0));
      const int64_t stop = std::min(n, (c + 1) * kChunk);
      for (int64_t t = c * kChunk; t < stop; t += kTile) {
        const int64_t m = std::min(kTile, stop - t);
        for (int64_t i = 0; i < m; ++i) gbuf[i] = static_cast<acc_t>(g[t + i]);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* yk = ys[k] + t;
          acc_t acc[kLanes];
          std::copy_n(&lanes[k * kLanes], kLanes, acc);
          int64_t i = 0;
          for (; i + kLanes <= m; i += kLanes)
            for (int j = 0; j < kLanes; ++j) acc[j] += gbuf[i + j] * static_cast<acc_t>(yk[i + j]);
          for (int j = 0; i < m; ++i, ++j) acc[j] += gbuf[i] * static_cast<acc_t>(yk[i]);
          std::copy_n(acc, kLanes, &lanes[k * kLanes]);
          if (scalar_t* gy = gys[k]) {
            const acc_t wk = w[k];
            for (int64_t i2 = 0; i2 < m; ++i2) gy[t + i2] = static_cast<scalar_t>(wk * gbuf[i2]);
          }
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        // Pairwise sum of the lanes: fixed order, better rounding than a running sum.
        acc_t* l = &lanes[k * kLanes];
        for (int width = kLanes / 2; width > 0; width /= 2)
          for (int j = 0; j < width; ++j) l[j] += l[j + width];
        partials[c * K + k] = l[0];
      }
    }
  });
}

}  // namespace

at::Tensor mixed_op_cpu(at::TensorList ys_in, const at::Tensor& weights) {
  check_mixed_op(ys_in, weights);
  const auto fmt = common_format(ys_in);
  const auto ys = dense_in(ys_in, fmt);
  at::Tensor out = at::empty(ys[0].sizes(), ys[0].options().memory_format(fmt));
  const at::Tensor w = acc_weights(weights, ys[0].scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_op_cpu", [&] {
    std::vector<const scalar_t*> ptrs;
    for (const auto& y : ys) ptrs.push_back(y.const_data_ptr<scalar_t>());
    forward_kernel<scalar_t>(ptrs, w.const_data_ptr<at::opmath_type<scalar_t>>(),
                             out.mutable_data_ptr<scalar_t>(), out.numel());
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_backward_cpu(
    const at::Tensor& grad_in, at::TensorList ys_in, const at::Tensor& weights,
    const c10::List<bool>& ys_mask) {
  check_mixed_op(ys_in, weights);
  const int64_t K = static_cast<int64_t>(ys_in.size());
  TORCH_CHECK(static_cast<int64_t>(ys_mask.size()) == K, "mixed_op_backward: ys_mask has ",
              ys_mask.size(), " entries for ", K, " inputs");
  TORCH_CHECK(grad_in.sizes() == ys_in[0].sizes() && grad_in.scalar_type() == ys_in[0].scalar_type(),
              "mixed_op_backward: grad must match ys in shape and dtype");
  const auto fmt = common_format(ys_in);
  const auto ys = dense_in(ys_in, fmt);
  const at::Tensor grad = grad_in.contiguous(fmt);
  const at::Tensor w = acc_weights(weights, ys[0].scalar_type());
  const auto opts = ys[0].options().memory_format(fmt);
  std::vector<at::Tensor> grad_ys;
  for (int64_t k = 0; k < K; ++k)
    if (ys_mask.get(k)) grad_ys.push_back(at::empty(ys[0].sizes(), opts));
  const int64_t n = grad.numel();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::Tensor partials = at::empty({nchunks, K}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixed_op_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> yp;
    std::vector<scalar_t*> gp;
    size_t j = 0;
    for (int64_t k = 0; k < K; ++k) {
      yp.push_back(ys[k].const_data_ptr<scalar_t>());
      gp.push_back(ys_mask.get(k) ? grad_ys[j++].mutable_data_ptr<scalar_t>() : nullptr);
    }
    backward_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), yp, w.const_data_ptr<acc_t>(), gp,
                              partials.mutable_data_ptr<acc_t>(), n);
  });
  // Finishing pass: chunk partials summed in chunk order, one value per candidate.
  at::Tensor grad_w = at::zeros({K}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "mixed_op_finish_cpu", [&] {
    const scalar_t* p = partials.const_data_ptr<scalar_t>();
    scalar_t* gw = grad_w.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < nchunks; ++c)
      for (int64_t k = 0; k < K; ++k) gw[k] += p[c * K + k];
  });
  return {grad_ys, grad_w.to(weights.scalar_type())};
}

TORCH_LIBRARY_IMPL(gaea, CPU, m) {
  m.impl("mixed_op", &mixed_op_cpu);
  m.impl("mixed_op_backward", &mixed_op_backward_cpu);
}

}  // namespace gaea
