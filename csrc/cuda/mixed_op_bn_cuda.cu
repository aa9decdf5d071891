// CUDA mixed_op_bn: candidates ending in BatchNorm(affine=False) normalized inside the mix.
//
// Launches per call (whatever K, Z and the pf codes), so an edge costs what one fused op
// costs on the host (the point of the op: at the papers' sizes a GPU step is launch-bound):
//   forward   1. stats_kernel, grid (C, Z): per-channel mean and variance of every z (two
//                passes over the channel, block-reduced in a fixed order), the running-stat
//                update in place (momentum, or 1 / (num_batches_tracked + 1) when None)
//             2. forward_kernel, grid-stride over the output: normalizes each z on the fly,
//                adds the plain ys and the parameter-free candidates of x, mixes; its first
//                thread increments num_batches_tracked (after kernel 1 has read it)
//   backward  3. reduce_kernel, grid (C, rows): per channel, sum(grad) and, per candidate,
//                sum(grad * (z - mean)) for BN inputs, sum(grad * candidate) for the others
//                when the weight gradient is wanted
//             4. backward_kernel, grid-stride: grad_ys = w * grad, the BN backward for every
//                wanted grad_z, the pf part of grad_x as a gather over each element's 3x3
//                neighbours (the max pool's scatter made deterministic); its first thread
//                sums kernel 3's rows per candidate, in channel order, into grad_weights.
// Every sum has a fixed shape, so results are deterministic without atomics. The 3x3 windows
// are read straight from global memory (the 9x reuse is served by L1/L2). Simple one-thread-
// per-element code: at these sizes a launch costs more than the bytes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../common.h"
#include "../ops.h"
#include "launch.cuh"
#include "reduce.cuh"

namespace gaea {
namespace {

constexpr int kCand = kMaxK + kMaxPf;  // ys + zs (at most kMaxK together), then pf

struct Shape {
  int64_t n;                // elements of the output
  int64_t C, S, M;          // BN channels, spatial size, elements per channel
  bool cl;                  // channels_last: channel = i % C, else (i / S) % C
  int64_t H, W, P, N;       // pf windows: image rows, columns, values per pixel, image size
};

struct Cands {
  int K, Z, npf;
  int pf[kMaxPf];
  int widx[kCand];  // weights entry of each candidate: ys, zs, pf
};

__device__ __forceinline__ int64_t channel_of(int64_t i, const Shape& s) {
  return s.cl ? i % s.C : (i / s.S) % s.C;
}

// The i-th element of channel c, m in [0, M).
__device__ __forceinline__ int64_t channel_elem(int64_t c, int64_t m, const Shape& s) {
  return s.cl ? m * s.C + c : ((m / s.S) * s.C + c) * s.S + m % s.S;
}

__device__ __forceinline__ void coords(int64_t i, const Shape& s, int64_t& h, int64_t& w) {
  const int64_t pix = (i % s.N) / s.P;
  h = pix / s.W;
  w = pix - h * s.W;
}

template <typename acc_t>
__device__ __forceinline__ bool takes(acc_t v, acc_t m) {
  return v > m || v != v;  // PyTorch's max-pool rule: greater, or NaN
}

// Parameter-free candidate `code` of x at element i (stride 1, pad 1, 3x3; avg without pad).
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t pf_value(const T* x, int code, int64_t i, const Shape& s) {
  if (code == kPfSkip) return static_cast<acc_t>(x[i]);
  int64_t h, w;
  coords(i, s, h, w);
  const int64_t RL = s.W * s.P;
  acc_t sum = 0, best = 0;
  int count = 0;
  bool first = true;
  for (int dy = -1; dy <= 1; ++dy) {
    if (h + dy < 0 || h + dy >= s.H) continue;
    for (int dx = -1; dx <= 1; ++dx) {
      if (w + dx < 0 || w + dx >= s.W) continue;
      const acc_t v = static_cast<acc_t>(x[i + dy * RL + dx * s.P]);
      sum += v;
      ++count;
      if (first || takes(v, best)) best = v;
      first = false;
    }
  }
  return code == kPfAvgPool ? sum / static_cast<acc_t>(count) : best;
}

// Offset (relative to i) of the maximum of element i's window under PyTorch's rule.
template <typename T, typename acc_t>
__device__ __forceinline__ int64_t argmax_offset(const T* x, int64_t i, const Shape& s) {
  int64_t h, w;
  coords(i, s, h, w);
  const int64_t RL = s.W * s.P;
  acc_t best = 0;
  int64_t arg = 0;
  bool first = true;
  for (int dy = -1; dy <= 1; ++dy) {
    if (h + dy < 0 || h + dy >= s.H) continue;
    for (int dx = -1; dx <= 1; ++dx) {
      if (w + dx < 0 || w + dx >= s.W) continue;
      const int64_t off = dy * RL + dx * s.P;
      const acc_t v = static_cast<acc_t>(x[i + off]);
      if (first || takes(v, best)) best = v, arg = off;
      first = false;
    }
  }
  return arg;
}

// Vector-Jacobian product of pf candidate `code` at input element i: a gather over the
// windows holding i, which are i's own 3x3 neighbours (clipped), in a fixed order.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t pf_vjp(const T* x, const T* grad, int code, int64_t i, const Shape& s) {
  if (code == kPfSkip) return static_cast<acc_t>(grad[i]);
  int64_t h, w;
  coords(i, s, h, w);
  const int64_t RL = s.W * s.P;
  acc_t acc = 0;
  for (int dy = -1; dy <= 1; ++dy) {
    const int64_t hh = h + dy;
    if (hh < 0 || hh >= s.H) continue;
    for (int dx = -1; dx <= 1; ++dx) {
      const int64_t ww = w + dx;
      if (ww < 0 || ww >= s.W) continue;
      const int64_t p = i + dy * RL + dx * s.P;  // an output whose window holds i
      if (code == kPfAvgPool) {
        const int rows = 1 + (hh > 0) + (hh < s.H - 1), cols = 1 + (ww > 0) + (ww < s.W - 1);
        acc += static_cast<acc_t>(grad[p]) / static_cast<acc_t>(rows * cols);
      } else if (p + argmax_offset<T, acc_t>(x, p, s) == i) {
        acc += static_cast<acc_t>(grad[p]);
      }
    }
  }
  return acc;
}

// ---- forward ----------------------------------------------------------------------------

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(Ptrs<const T> zs, Shape s, acc_t* stats, Ptrs<acc_t> rm, Ptrs<acc_t> rv, bool running,
                 Ptrs<int64_t> nbt, bool counted, double momentum, bool has_momentum, double eps) {
  __shared__ acc_t scratch[kThreads / kWarp];
  __shared__ acc_t shared_mean;
  const int64_t c = blockIdx.x;
  const int j = blockIdx.y;
  const T* z = zs.p[j];
  acc_t sum = 0;
  for (int64_t m = threadIdx.x; m < s.M; m += blockDim.x) sum += static_cast<acc_t>(z[channel_elem(c, m, s)]);
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) shared_mean = sum / static_cast<acc_t>(s.M);
  __syncthreads();
  const acc_t mean = shared_mean;
  acc_t sq = 0;
  for (int64_t m = threadIdx.x; m < s.M; m += blockDim.x) {
    const acc_t d = static_cast<acc_t>(z[channel_elem(c, m, s)]) - mean;
    sq += d * d;
  }
  sq = block_sum(sq, scratch);
  if (threadIdx.x != 0) return;
  const acc_t var = sq / static_cast<acc_t>(s.M);
  acc_t* st = stats + static_cast<int64_t>(j) * 2 * s.C;
  st[c] = mean;
  st[s.C + c] = acc_t(1) / sqrt(var + static_cast<acc_t>(eps));
  if (!running) return;
  // nn.BatchNorm2d: num_batches_tracked is incremented first (kernel 2 stores it), then the
  // factor is momentum, or 1 / num_batches_tracked for a cumulative average.
  double factor = has_momentum ? momentum : 0.0;
  if (!has_momentum && counted) factor = 1.0 / static_cast<double>(*nbt.p[j] + 1);
  const acc_t f = static_cast<acc_t>(factor);
  const acc_t unbiased = s.M > 1 ? var * static_cast<acc_t>(s.M) / static_cast<acc_t>(s.M - 1) : var;
  rm.p[j][c] = (acc_t(1) - f) * rm.p[j][c] + f * mean;
  rv.p[j][c] = (acc_t(1) - f) * rv.p[j][c] + f * unbiased;
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* x, Ptrs<const T> in, Cands cd, const acc_t* wall, const acc_t* stats, Shape s, T* out,
                   Ptrs<int64_t> nbt, int n_nbt) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid == 0)
    for (int j = 0; j < n_nbt; ++j) *nbt.p[j] += 1;
  const int KZ = cd.K + cd.Z;
  for (int64_t i = tid; i < s.n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(i, s);
    acc_t o = 0;
    for (int k = 0; k < cd.K; ++k) o += wall[cd.widx[k]] * static_cast<acc_t>(in.p[k][i]);
    for (int j = 0; j < cd.Z; ++j) {
      const acc_t* st = stats + static_cast<int64_t>(j) * 2 * s.C;
      o += wall[cd.widx[cd.K + j]] * ((static_cast<acc_t>(in.p[cd.K + j][i]) - st[c]) * st[s.C + c]);
    }
    for (int p = 0; p < cd.npf; ++p) o += wall[cd.widx[KZ + p]] * pf_value<T, acc_t>(x, cd.pf[p], i, s);
    out[i] = static_cast<T>(o);
  }
}

// ---- backward ---------------------------------------------------------------------------

// Row r of the per-channel sums: 0 sum(grad); 1 + k sum(grad * y_k); 1 + K + j
// sum(grad * (z_j - mean_j)); 1 + K + Z + p sum(grad * pf_p(x)).
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const T* grad, const T* x, Ptrs<const T> in, Cands cd, const acc_t* stats, Shape s, acc_t* red) {
  __shared__ acc_t scratch[kThreads / kWarp];
  const int64_t c = blockIdx.x;
  const int r = blockIdx.y;
  const int KZ = cd.K + cd.Z;
  acc_t sum = 0;
  for (int64_t m = threadIdx.x; m < s.M; m += blockDim.x) {
    const int64_t i = channel_elem(c, m, s);
    const acc_t g = static_cast<acc_t>(grad[i]);
    acc_t v = 1;
    if (r >= 1 && r <= cd.K) {
      v = static_cast<acc_t>(in.p[r - 1][i]);
    } else if (r > cd.K && r <= KZ) {
      const int j = r - 1 - cd.K;
      v = static_cast<acc_t>(in.p[cd.K + j][i]) - stats[static_cast<int64_t>(j) * 2 * s.C + c];
    } else if (r > KZ) {
      v = pf_value<T, acc_t>(x, cd.pf[r - 1 - KZ], i, s);
    }
    sum += g * v;
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) red[static_cast<int64_t>(r) * s.C + c] = sum;
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* grad, const T* x, Ptrs<const T> in, Cands cd, const acc_t* wall, int64_t n_weights,
                    const acc_t* stats, Shape s, const acc_t* red, bool weights_grad, Ptrs<T> gin, T* gx,
                    acc_t* grad_w) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int KZ = cd.K + cd.Z;
  if (tid == 0) for (int64_t e = 0; e < n_weights; ++e) grad_w[e] = 0;  // no memset launch
  if (tid == 0 && weights_grad) {
    const int rows = 1 + KZ + cd.npf;
    for (int r = 1; r < rows; ++r) {
      const acc_t* invstd =
          (r > cd.K && r <= KZ) ? stats + static_cast<int64_t>(r - 1 - cd.K) * 2 * s.C + s.C : nullptr;
      acc_t acc = 0;
      for (int64_t c = 0; c < s.C; ++c) acc += invstd ? red[r * s.C + c] * invstd[c] : red[r * s.C + c];
      grad_w[cd.widx[r - 1]] += acc;
    }
  }
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(s.M);
  for (int64_t i = tid; i < s.n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t g = static_cast<acc_t>(grad[i]);
    for (int k = 0; k < cd.K; ++k)
      if (gin.p[k] != nullptr) gin.p[k][i] = static_cast<T>(wall[cd.widx[k]] * g);
    if (cd.Z > 0) {
      const int64_t c = channel_of(i, s);
      const acc_t gmean = red[c] * inv_m;
      for (int j = 0; j < cd.Z; ++j) {
        T* gz = gin.p[cd.K + j];
        if (gz == nullptr) continue;
        const acc_t* st = stats + static_cast<int64_t>(j) * 2 * s.C;
        const acc_t invstd = st[s.C + c];
        const acc_t y = (static_cast<acc_t>(in.p[cd.K + j][i]) - st[c]) * invstd;
        const acc_t coef = red[static_cast<int64_t>(1 + cd.K + j) * s.C + c] * invstd * inv_m;
        gz[i] = static_cast<T>(wall[cd.widx[cd.K + j]] * invstd * (g - gmean - y * coef));
      }
    }
    if (gx != nullptr) {
      acc_t acc = 0;
      for (int p = 0; p < cd.npf; ++p) acc += wall[cd.widx[KZ + p]] * pf_vjp<T, acc_t>(x, grad, cd.pf[p], i, s);
      gx[i] = static_cast<T>(acc);
    }
  }
}

Shape shape_of(const at::Tensor& out, const PfGeometry& geo, const BnChannels& ch) {
  Shape s;
  s.n = out.numel();
  s.C = ch.C;
  s.S = ch.S;
  s.M = ch.M;
  s.cl = ch.cl;
  s.H = geo.H;
  s.W = geo.W;
  s.P = geo.P;
  s.N = geo.H * geo.W * geo.P;
  return s;
}

Cands cands_of(int64_t K, int64_t Z, const std::vector<int64_t>& pf, const std::vector<int64_t>& widx) {
  Cands cd{};
  cd.K = static_cast<int>(K);
  cd.Z = static_cast<int>(Z);
  cd.npf = static_cast<int>(pf.size());
  for (size_t p = 0; p < pf.size(); ++p) cd.pf[p] = static_cast<int>(pf[p]);
  for (size_t i = 0; i < widx.size(); ++i) cd.widx[i] = static_cast<int>(widx[i]);
  return cd;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mixed_op_bn_cuda(const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                                                    const at::Tensor& weights, at::IntArrayRef pf,
                                                    at::TensorList running_means, at::TensorList running_vars,
                                                    at::TensorList batches_tracked, c10::optional<double> momentum,
                                                    double eps, at::IntArrayRef w_index) {
  const BnForward fw =
      prepare_bn_forward(x, ys, zs, weights, pf, running_means, running_vars, batches_tracked, w_index);
  const c10::cuda::CUDAGuard guard(fw.zs[0].device());
  const int64_t K = static_cast<int64_t>(fw.ys.size()), Z = static_cast<int64_t>(fw.zs.size());
  const auto acc = acc_type(fw.out.scalar_type());
  const at::Tensor& stats = fw.stats;
  const bool running = !running_means.empty();
  // The kernels update running statistics of the accumulation type in place; others (a
  // module converted to half) go through a copy.
  std::vector<at::Tensor> rm, rv;
  for (size_t j = 0; j < running_means.size(); ++j) {
    rm.push_back(running_means[j].scalar_type() == acc ? running_means[j] : running_means[j].to(acc));
    rv.push_back(running_vars[j].scalar_type() == acc ? running_vars[j] : running_vars[j].to(acc));
  }
  const Shape s = shape_of(fw.out, fw.geo, fw.ch);
  const Cands cd = cands_of(K, Z, fw.pf, fw.widx);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fw.out.scalar_type(), "mixed_op_bn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Ptrs<const scalar_t> in{}, zp{};
    for (int64_t k = 0; k < K; ++k) in.p[k] = fw.ys[k].const_data_ptr<scalar_t>();
    for (int64_t j = 0; j < Z; ++j) in.p[K + j] = zp.p[j] = fw.zs[j].const_data_ptr<scalar_t>();
    Ptrs<acc_t> rmp{}, rvp{};
    for (size_t j = 0; j < rm.size(); ++j) {
      rmp.p[j] = rm[j].mutable_data_ptr<acc_t>();
      rvp.p[j] = rv[j].mutable_data_ptr<acc_t>();
    }
    Ptrs<int64_t> nbt{};
    for (size_t j = 0; j < batches_tracked.size(); ++j) nbt.p[j] = batches_tracked[j].mutable_data_ptr<int64_t>();
    if (s.n > 0) {
      stats_kernel<scalar_t, acc_t><<<dim3(s.C, Z), kThreads, 0, stream>>>(
          zp, s, stats.mutable_data_ptr<acc_t>(), rmp, rvp, running, nbt, !batches_tracked.empty(),
          momentum.value_or(0.0), momentum.has_value(), eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    forward_kernel<scalar_t, acc_t><<<grid_for(s.n), kThreads, 0, stream>>>(
        fw.x.defined() ? fw.x.const_data_ptr<scalar_t>() : nullptr, in, cd, fw.w.const_data_ptr<acc_t>(),
        stats.const_data_ptr<acc_t>(), s, fw.out.mutable_data_ptr<scalar_t>(), nbt,
        static_cast<int>(batches_tracked.size()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  for (size_t j = 0; j < rm.size(); ++j) {
    if (!rm[j].is_same(running_means[j])) running_means[j].copy_(rm[j]);
    if (!rv[j].is_same(running_vars[j])) running_vars[j].copy_(rv[j]);
  }
  return {fw.out, stats};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> mixed_op_bn_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, at::TensorList ys_in, at::TensorList zs_in,
    const at::Tensor& weights, at::IntArrayRef pf_in, const at::Tensor& stats_in, const c10::List<bool>& ys_mask,
    const c10::List<bool>& zs_mask, bool x_grad, bool weights_grad, at::IntArrayRef w_index) {
  const BnBackward bw = prepare_bn_backward(grad_in, x_in, ys_in, zs_in, weights, pf_in, stats_in, ys_mask, zs_mask,
                                            x_grad, w_index);
  const c10::cuda::CUDAGuard guard(bw.zs[0].device());
  const int64_t K = static_cast<int64_t>(bw.ys.size()), Z = static_cast<int64_t>(bw.zs.size());
  const int64_t npf = static_cast<int64_t>(bw.pf.size());
  const Shape s = shape_of(bw.grad, bw.geo, bw.ch);
  const Cands cd = cands_of(K, Z, bw.pf, bw.widx);
  // Rows of per-channel sums: grad and the BN inputs always (the BN backward needs them),
  // the other candidates only for the weight gradient.
  const int64_t rows = weights_grad ? 1 + K + Z + npf : 1 + K + Z;
  at::Tensor red = at::empty({rows, s.C}, bw.w.options());
  // Written whole (zeros unless weights_grad) by backward_kernel's first thread: no memset.
  at::Tensor grad_w = at::empty(bw.w.sizes(), bw.w.options());
  const bool want_gx = bw.grad_x.numel() > 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bw.grad.scalar_type(), "mixed_op_bn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Ptrs<const scalar_t> in{};
    Ptrs<scalar_t> gin{};
    for (int64_t k = 0, n = 0; k < K; ++k) {
      in.p[k] = bw.ys[k].const_data_ptr<scalar_t>();
      gin.p[k] = ys_mask.get(k) ? bw.grad_ys[n++].mutable_data_ptr<scalar_t>() : nullptr;
    }
    for (int64_t j = 0, n = 0; j < Z; ++j) {
      in.p[K + j] = bw.zs[j].const_data_ptr<scalar_t>();
      gin.p[K + j] = zs_mask.get(j) ? bw.grad_zs[n++].mutable_data_ptr<scalar_t>() : nullptr;
    }
    const scalar_t* xp = bw.x.defined() ? bw.x.const_data_ptr<scalar_t>() : nullptr;
    if (s.n > 0) {
      // Rows K+1..K+Z come after the ys' rows: without the weight gradient those are still
      // launched (cheap) so that the row layout stays the same.
      reduce_kernel<scalar_t, acc_t><<<dim3(s.C, rows), kThreads, 0, stream>>>(
          bw.grad.const_data_ptr<scalar_t>(), xp, in, cd, bw.stats.const_data_ptr<acc_t>(), s,
          red.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    backward_kernel<scalar_t, acc_t><<<grid_for(s.n), kThreads, 0, stream>>>(
        bw.grad.const_data_ptr<scalar_t>(), xp, in, cd, bw.w.const_data_ptr<acc_t>(), bw.w.numel(),
        bw.stats.const_data_ptr<acc_t>(), s, red.const_data_ptr<acc_t>(), weights_grad && s.n > 0, gin,
        want_gx ? bw.grad_x.mutable_data_ptr<scalar_t>() : nullptr, grad_w.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {bw.grad_ys, bw.grad_zs, bw.grad_x, grad_w.to(weights.scalar_type())};
}

TORCH_LIBRARY_IMPL(gaea, CUDA, m) {
  m.impl("mixed_op_bn", &mixed_op_bn_cuda);
  m.impl("mixed_op_bn_backward", &mixed_op_bn_backward_cuda);
}

}  // namespace gaea
