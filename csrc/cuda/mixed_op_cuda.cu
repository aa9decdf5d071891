// CUDA mixed op. Forward moves (K+1)·N elements, backward at most (2K+1)·N: both are pure
// bandwidth, so each thread issues K independent 16-byte loads per step and the K pointers
// ride in the launch arguments (no stacking, no pointer array in device memory).
// K is a template parameter for the common 1..8 (dot-product accumulators stay in
// registers; K = 1 is common after --prune-below); other K, or inputs that are not 16-byte
// aligned, take the generic kernel, whose backward handles kChunk candidates per launch so
// that its accumulators stay few (a 64-entry array cost about 210 registers).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../common.h"
#include "../ops.h"
#include "launch.cuh"
#include "reduce.cuh"
#include "vec.cuh"

namespace gaea {
namespace {

template <typename scalar_t, int K, int V>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(Ptrs<const scalar_t> ys, int k_rt, const at::opmath_type<scalar_t>* w,
                   scalar_t* out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int nk = K > 0 ? K : k_rt;
  __shared__ acc_t ws[kMaxK];
  for (int k = threadIdx.x; k < nk; k += blockDim.x) ws[k] = w[k];
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / V;
  for (int64_t vi = tid; vi < nvec; vi += stride) {
    acc_t acc[V];
    const auto y0 = load_vec<V>(ys.p[0], vi);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = ws[0] * static_cast<acc_t>(y0.v[j]);
#pragma unroll
    for (int k = 1; k < (K > 0 ? K : kMaxK); ++k) {
      if (K == 0 && k >= nk) break;
      const auto yk = load_vec<V>(ys.p[k], vi);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += ws[k] * static_cast<acc_t>(yk.v[j]);
    }
    Vec<scalar_t, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = static_cast<scalar_t>(acc[j]);
    store_vec<V>(out, vi, o);
  }
  for (int64_t i = nvec * V + tid; i < n; i += stride) {  // scalar tail
    acc_t acc = 0;
    for (int k = 0; k < nk; ++k) acc += ws[k] * static_cast<acc_t>(ys.p[k][i]);
    out[i] = static_cast<scalar_t>(acc);
  }
}

// Candidates per launch of the generic backward kernel (K = 0): the host launches it once per
// chunk of up to kChunk candidates (ys, gys, w and partials offset to the chunk), so grad is
// read ceil(K / kChunk) times instead of once, a few percent more traffic for K > 8.
constexpr int kChunk = 16;

// Each block leaves its partial dot products in partials[blockIdx.x * ldp + k] (ldp: all K
// candidates); finish_kernel adds them in block order. grad_ys[k] = w[k] * grad is written in
// the same pass.
template <typename scalar_t, int K, int V>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* g, Ptrs<const scalar_t> ys, Ptrs<scalar_t> gys, int k_rt,
                    const at::opmath_type<scalar_t>* w, bool dots,
                    at::opmath_type<scalar_t>* partials, int ldp, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int KA = K > 0 ? K : kChunk;
  const int nk = K > 0 ? K : k_rt;
  __shared__ acc_t ws[KA];
  __shared__ acc_t scratch[kThreads / kWarp][KA];
  for (int k = threadIdx.x; k < nk; k += blockDim.x) ws[k] = w[k];
  __syncthreads();
  acc_t dot[KA];
#pragma unroll
  for (int k = 0; k < KA; ++k) dot[k] = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / V;
  for (int64_t vi = tid; vi < nvec; vi += stride) {
    const auto gv = load_vec<V>(g, vi);
    acc_t gf[V];
#pragma unroll
    for (int j = 0; j < V; ++j) gf[j] = static_cast<acc_t>(gv.v[j]);
#pragma unroll
    for (int k = 0; k < KA; ++k) {
      if (K == 0 && k >= nk) break;
      if (dots) {
        const auto yk = load_vec<V>(ys.p[k], vi);
#pragma unroll
        for (int j = 0; j < V; ++j) dot[k] += gf[j] * static_cast<acc_t>(yk.v[j]);
      }
      if (gys.p[k] != nullptr) {
        Vec<scalar_t, V> o;
#pragma unroll
        for (int j = 0; j < V; ++j) o.v[j] = static_cast<scalar_t>(ws[k] * gf[j]);
        store_vec<V>(gys.p[k], vi, o);
      }
    }
  }
  for (int64_t i = nvec * V + tid; i < n; i += stride) {  // scalar tail
    const acc_t gi = static_cast<acc_t>(g[i]);
#pragma unroll
    for (int k = 0; k < KA; ++k) {  // unrolled so dot[] stays in registers
      if (K == 0 && k >= nk) break;
      if (dots) dot[k] += gi * static_cast<acc_t>(ys.p[k][i]);
      if (gys.p[k] != nullptr) gys.p[k][i] = static_cast<scalar_t>(ws[k] * gi);
    }
  }
  if (!dots) return;  // uniform across the grid
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int k = 0; k < KA; ++k) {
    if (K == 0 && k >= nk) break;
    const acc_t s = warp_sum(dot[k]);
    if (lane == 0) scratch[warp][k] = s;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < nk; k += blockDim.x) {
    acc_t s = 0;
    for (int wi = 0; wi < kThreads / kWarp; ++wi) s += scratch[wi][k];
    partials[static_cast<int64_t>(blockIdx.x) * ldp + k] = s;
  }
}

// Calls f(integral_constant<K>, integral_constant<V>) for the kernel instance to launch.
template <typename scalar_t, typename F>
void dispatch_k(int K, bool aligned, F&& f) {
  constexpr int V = vec_width<scalar_t>();
  using std::integral_constant;
  if (!aligned) return f(integral_constant<int, 0>{}, integral_constant<int, 1>{});
  switch (K) {
#define GAEA_CASE(k) \
  case k:            \
    return f(integral_constant<int, k>{}, integral_constant<int, V>{});
    GAEA_CASE(1) GAEA_CASE(2) GAEA_CASE(3) GAEA_CASE(4) GAEA_CASE(5) GAEA_CASE(6) GAEA_CASE(7) GAEA_CASE(8)
#undef GAEA_CASE
    default:
      return f(integral_constant<int, 0>{}, integral_constant<int, V>{});
  }
}

}  // namespace

at::Tensor mixed_op_cuda(at::TensorList ys_in, const at::Tensor& weights) {
  // Validate first: a CPU tensor among the inputs gets the "is on" message, not the guard's.
  const MixedForward f = prepare_forward(ys_in, weights);
  const c10::cuda::CUDAGuard guard(ys_in[0].device());
  const auto& ys = f.ys;
  const at::Tensor& w = f.w;
  const at::Tensor& out = f.out;
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int K = static_cast<int>(ys.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_op_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Ptrs<const scalar_t> yp{};
    bool aligned = aligned16(out.const_data_ptr());
    for (int k = 0; k < K; ++k) {
      yp.p[k] = ys[k].const_data_ptr<scalar_t>();
      aligned = aligned && aligned16(yp.p[k]);
    }
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_k<scalar_t>(K, aligned, [&](auto kc, auto vc) {
      constexpr int kK = decltype(kc)::value, kV = decltype(vc)::value;
      forward_kernel<scalar_t, kK, kV><<<grid_for(n / kV), kThreads, 0, stream>>>(
          yp, K, w.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_backward_cuda(
    const at::Tensor& grad_in, at::TensorList ys_in, const at::Tensor& weights,
    const c10::List<bool>& ys_mask, bool weights_grad) {
  const MixedBackward bw = prepare_backward(grad_in, ys_in, weights, ys_mask);  // validates first
  const c10::cuda::CUDAGuard guard(ys_in[0].device());
  const auto& ys = bw.ys;
  const at::Tensor& w = bw.w;
  const at::Tensor& grad = bw.grad;
  const auto& grad_ys = bw.grad_ys;
  const int K = static_cast<int>(ys.size());
  const int64_t n = grad.numel();
  if (n == 0) return {grad_ys, at::zeros({K}, weights.options())};
  at::Tensor grad_w = weights_grad ? at::empty({K}, w.options()) : at::zeros({K}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixed_op_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Ptrs<const scalar_t> yp{};
    Ptrs<scalar_t> gp{};
    bool aligned = aligned16(grad.const_data_ptr());
    for (int k = 0, j = 0; k < K; ++k) {
      yp.p[k] = ys[k].const_data_ptr<scalar_t>();
      gp.p[k] = ys_mask.get(k) ? grad_ys[j++].mutable_data_ptr<scalar_t>() : nullptr;
      aligned = aligned && aligned16(yp.p[k]) && aligned16(gp.p[k]);
    }
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_k<scalar_t>(K, aligned, [&](auto kc, auto vc) {
      constexpr int kK = decltype(kc)::value, kV = decltype(vc)::value;
      const int blocks = grid_for(n / kV);
      at::Tensor partials = at::empty({weights_grad ? blocks : 0, K}, w.options());
      acc_t* part = partials.mutable_data_ptr<acc_t>();
      const acc_t* wp = w.const_data_ptr<acc_t>();
      if constexpr (kK > 0) {
        backward_kernel<scalar_t, kK, kV><<<blocks, kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), yp, gp, K, wp, weights_grad, part, K, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        for (int k0 = 0; k0 < K; k0 += kChunk) {  // the generic kernel: one launch per chunk
          const int nk = std::min(kChunk, K - k0);
          Ptrs<const scalar_t> yc{};
          Ptrs<scalar_t> gc{};
          for (int k = 0; k < nk; ++k) {
            yc.p[k] = yp.p[k0 + k];
            gc.p[k] = gp.p[k0 + k];
          }
          backward_kernel<scalar_t, 0, kV><<<blocks, kThreads, 0, stream>>>(
              grad.const_data_ptr<scalar_t>(), yc, gc, nk, wp + k0, weights_grad,
              weights_grad ? part + k0 : part, K, n);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
      if (!weights_grad) return;
      finish_kernel<acc_t><<<K, kThreads, 0, stream>>>(partials.const_data_ptr<acc_t>(), blocks, K,
                                                      grad_w.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_ys, grad_w.to(weights.scalar_type())};
}

TORCH_LIBRARY_IMPL(gaea, CUDA, m) {
  m.impl("mixed_op", &mixed_op_cuda);
  m.impl("mixed_op_backward", &mixed_op_backward_cuda);
}

}  // namespace gaea
