// CUDA mixed op with parameter-free candidates (skip, 3x3 avg / max pool, stride 1, pad 1)
// computed from x. Traffic per element as in the CPU twin: forward K + 2 reads/writes,
// backward at most 2K + 3, plus one byte per element for the max pool's argmax codes.
//
// One thread per element, grid-stride. The 3x3 window is read straight from global memory:
// neighbouring threads read overlapping windows, so the 9x reuse is served by L1/L2 and
// DRAM traffic stays ~1x; no shared-memory tiling, which keeps any layout (NCHW planes or
// channels_last pixels of P values) one code path.
//
// Backward: kernel 1 writes grad_ys, recomputes the pools for the weight-gradient dot
// products (per-block partials, no atomics) and, for the max pool, stores where each
// window's maximum came from (a neighbour code 0..8). Kernel 2 computes grad_x as a gather:
// the windows holding element p are p's own 3x3 neighbours, visited in a fixed order, so the
// max pool's scatter becomes deterministic without atomics. finish_kernel (launch.cuh) adds
// the partials in block order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../common.h"
#include "../ops.h"
#include "launch.cuh"
#include "reduce.cuh"

namespace gaea {
namespace {

constexpr int kTerms = kMaxK + kMaxPf;

struct Geo {
  int64_t H, W, P, RL, N;  // RL: elements per image row; N: elements per image
};

struct Codes {
  int c[kMaxPf];
  int n;
  bool avg, max;
};

__device__ __forceinline__ void coords(int64_t i, const Geo& g, int64_t& h, int64_t& w) {
  const int64_t pix = (i % g.N) / g.P;
  h = pix / g.W;
  w = pix - h * g.W;
}

// PyTorch's max-pool rule: scanning the window row by row, a value replaces the running max
// if it is greater or NaN (ties keep the first maximum; the last NaN wins).
template <typename acc_t>
__device__ __forceinline__ bool takes(acc_t v, acc_t m) {
  return v > m || v != v;
}

// avg and max of x over element i's 3x3 window (clipped), scanned in row-major order;
// code = (dy + 1) * 3 + (dx + 1) of the maximum.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void window(const scalar_t* x, int64_t i, const Geo& g, acc_t& avg, acc_t& mx,
                                       int& code) {
  int64_t h, w;
  coords(i, g, h, w);
  const int dy0 = h > 0 ? -1 : 0, dy1 = h < g.H - 1 ? 1 : 0;
  const int dx0 = w > 0 ? -1 : 0, dx1 = w < g.W - 1 ? 1 : 0;
  acc_t sum = 0;
  mx = static_cast<acc_t>(x[i + dy0 * g.RL + dx0 * g.P]);
  code = (dy0 + 1) * 3 + (dx0 + 1);
  for (int dy = dy0; dy <= dy1; ++dy)
    for (int dx = dx0; dx <= dx1; ++dx) {
      const acc_t v = static_cast<acc_t>(x[i + dy * g.RL + dx * g.P]);
      sum += v;
      if (takes(v, mx)) mx = v, code = (dy + 1) * 3 + (dx + 1);
    }
  avg = sum / static_cast<acc_t>((dy1 - dy0 + 1) * (dx1 - dx0 + 1));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* x, Ptrs<const scalar_t> ys, int K, Codes pf,
                   const at::opmath_type<scalar_t>* w, scalar_t* out, int64_t n, Geo g) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t ws[kTerms];
  for (int k = threadIdx.x; k < K + pf.n; k += blockDim.x) ws[k] = w[k];
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    acc_t acc = 0;
    for (int k = 0; k < K; ++k) acc += ws[k] * static_cast<acc_t>(ys.p[k][i]);
    acc_t avg = 0, mx = 0;
    int code;
    if (pf.avg || pf.max) window(x, i, g, avg, mx, code);
    for (int j = 0; j < pf.n; ++j) {
      const acc_t t = pf.c[j] == kPfSkip ? static_cast<acc_t>(x[i]) : pf.c[j] == kPfAvgPool ? avg : mx;
      acc += ws[K + j] * t;
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

// grad_ys, the weight-gradient partials (partials[blockIdx.x * (K + npf) + j]) and the
// max pool's argmax codes. KA bounds K at compile time so the dot products stay in registers.
template <typename scalar_t, int KA>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* grad, const scalar_t* x, Ptrs<const scalar_t> ys, Ptrs<scalar_t> gys, int K,
                    Codes pf, const at::opmath_type<scalar_t>* w, bool dots, at::opmath_type<scalar_t>* partials,
                    uint8_t* arg, int64_t n, Geo g) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int KT = KA + kMaxPf;
  __shared__ acc_t ws[kTerms];
  __shared__ acc_t scratch[kThreads / kWarp][KT];
  const int nt = K + pf.n;
  for (int k = threadIdx.x; k < nt; k += blockDim.x) ws[k] = w[k];
  __syncthreads();
  acc_t dot[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) dot[k] = 0;
  const bool need_window = (dots && (pf.avg || pf.max)) || arg != nullptr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t gi = static_cast<acc_t>(grad[i]);
#pragma unroll
    for (int k = 0; k < KA; ++k) {
      if (k >= K) break;
      if (dots) dot[k] += gi * static_cast<acc_t>(ys.p[k][i]);
      if (gys.p[k] != nullptr) gys.p[k][i] = static_cast<scalar_t>(ws[k] * gi);
    }
    acc_t avg = 0, mx = 0;
    int code = 4;
    if (need_window) window(x, i, g, avg, mx, code);
    if (arg != nullptr) arg[i] = static_cast<uint8_t>(code);
    if (dots) {
#pragma unroll
      for (int j = 0; j < kMaxPf; ++j) {
        if (j >= pf.n) break;
        const acc_t t = pf.c[j] == kPfSkip ? static_cast<acc_t>(x[i]) : pf.c[j] == kPfAvgPool ? avg : mx;
        // dot[K + j] with a compile-time index: candidate j's slot is KA + j, moved to
        // K + j when the partials are written.
        dot[KA + j] += gi * t;
      }
    }
  }
  if (!dots) return;  // uniform across the grid
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    if ((k < KA && k >= K) || (k >= KA && k - KA >= pf.n)) continue;
    const acc_t s = warp_sum(dot[k]);
    if (lane == 0) scratch[warp][k] = s;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < nt; t += blockDim.x) {
    const int slot = t < K ? t : KA + (t - K);
    acc_t s = 0;
    for (int wi = 0; wi < kThreads / kWarp; ++wi) s += scratch[wi][slot];
    partials[static_cast<int64_t>(blockIdx.x) * nt + t] = s;
  }
}

// grad_x[p] = sum_j w_j * (candidate j's backward of grad)[p], gathered from p's neighbours.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    grad_x_kernel(const scalar_t* grad, const uint8_t* arg, int K, Codes pf, const at::opmath_type<scalar_t>* w,
                  scalar_t* gx, int64_t n, Geo g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n; p += stride) {
    int64_t h, wc;
    coords(p, g, h, wc);
    const int dy0 = h > 0 ? -1 : 0, dy1 = h < g.H - 1 ? 1 : 0;
    const int dx0 = wc > 0 ? -1 : 0, dx1 = wc < g.W - 1 ? 1 : 0;
    acc_t acc = 0;
    for (int j = 0; j < pf.n; ++j) {
      const acc_t wj = static_cast<acc_t>(w[K + j]);
      acc_t s = 0;
      if (pf.c[j] == kPfSkip) {
        s = static_cast<acc_t>(grad[p]);
      } else {
        for (int dy = dy0; dy <= dy1; ++dy)
          for (int dx = dx0; dx <= dx1; ++dx) {
            const int64_t q = p + dy * g.RL + dx * g.P;
            if (pf.c[j] == kPfAvgPool) {
              // q's window size: the rows and columns around (h + dy, wc + dx) inside the image
              const int64_t qh = h + dy, qw = wc + dx;
              const int cnt = (1 + (qh > 0) + (qh < g.H - 1)) * (1 + (qw > 0) + (qw < g.W - 1));
              s += static_cast<acc_t>(grad[q]) / static_cast<acc_t>(cnt);
            } else if (arg[q] == (1 - dy) * 3 + (1 - dx)) {  // q's maximum is p
              s += static_cast<acc_t>(grad[q]);
            }
          }
      }
      acc += wj * s;
    }
    gx[p] = static_cast<scalar_t>(acc);
  }
}

Geo geo_of(const PfGeometry& p) {
  return Geo{p.H, p.W, p.P, p.W * p.P, p.H * p.W * p.P};
}

Codes codes_of(const std::vector<int64_t>& pf) {
  Codes c{};
  c.n = static_cast<int>(pf.size());
  for (int j = 0; j < c.n; ++j) {
    c.c[j] = static_cast<int>(pf[j]);
    c.avg |= pf[j] == kPfAvgPool;
    c.max |= pf[j] == kPfMaxPool;
  }
  return c;
}

}  // namespace

at::Tensor mixed_op_pf_cuda(const at::Tensor& x_in, at::TensorList ys_in, const at::Tensor& weights,
                            at::IntArrayRef pf_in) {
  // Validate first: a CPU tensor among the inputs gets the "is on" message, not the guard's.
  const PfForward fw = prepare_pf_forward(x_in, ys_in, weights, pf_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = fw.out.numel();
  if (n == 0) return fw.out;
  const int K = static_cast<int>(fw.ys.size());
  const Codes pf = codes_of(fw.pf);
  const Geo g = geo_of(fw.geo);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fw.out.scalar_type(), "mixed_op_pf_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Ptrs<const scalar_t> yp{};
    for (int k = 0; k < K; ++k) yp.p[k] = fw.ys[k].const_data_ptr<scalar_t>();
    forward_kernel<scalar_t><<<grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        fw.x.const_data_ptr<scalar_t>(), yp, K, pf, fw.w.const_data_ptr<acc_t>(),
        fw.out.mutable_data_ptr<scalar_t>(), n, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return fw.out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> mixed_op_pf_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, at::TensorList ys_in, const at::Tensor& weights,
    at::IntArrayRef pf_in, const c10::List<bool>& ys_mask, bool x_grad, bool weights_grad) {
  const PfBackward bw = prepare_pf_backward(grad_in, x_in, ys_in, weights, pf_in, ys_mask, x_grad);  // validates first
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int K = static_cast<int>(bw.ys.size());
  const Codes pf = codes_of(bw.pf);
  const int nt = K + pf.n;
  const int64_t n = bw.grad.numel();
  if (n == 0) return {bw.grad_ys, bw.grad_x, at::zeros({nt}, weights.options())};
  const Geo g = geo_of(bw.geo);
  const bool want_gx = bw.grad_x.numel() > 0;
  at::Tensor grad_w = weights_grad ? at::empty({nt}, bw.w.options()) : at::zeros({nt}, bw.w.options());
  // One byte per element: where each max-pool window's maximum is (only for grad_x).
  at::Tensor arg = at::empty({want_gx && pf.max ? n : 0}, bw.grad.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bw.grad.scalar_type(), "mixed_op_pf_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Ptrs<const scalar_t> yp{};
    Ptrs<scalar_t> gp{};
    for (int k = 0, j = 0; k < K; ++k) {
      yp.p[k] = bw.ys[k].const_data_ptr<scalar_t>();
      gp.p[k] = ys_mask.get(k) ? bw.grad_ys[j++].mutable_data_ptr<scalar_t>() : nullptr;
    }
    auto stream = at::cuda::getCurrentCUDAStream();
    const int blocks = grid_for(n);
    at::Tensor partials = at::empty({weights_grad ? blocks : 0, nt}, bw.w.options());
    uint8_t* argp = arg.numel() > 0 ? arg.mutable_data_ptr<uint8_t>() : nullptr;
    auto launch = [&](auto ka) {
      constexpr int kKA = decltype(ka)::value;
      backward_kernel<scalar_t, kKA><<<blocks, kThreads, 0, stream>>>(
          bw.grad.const_data_ptr<scalar_t>(), bw.x.const_data_ptr<scalar_t>(), yp, gp, K, pf,
          bw.w.const_data_ptr<acc_t>(), weights_grad, partials.mutable_data_ptr<acc_t>(), argp, n, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (K <= 4)
      launch(std::integral_constant<int, 4>{});
    else if (K <= 8)
      launch(std::integral_constant<int, 8>{});
    else
      launch(std::integral_constant<int, kMaxK>{});
    if (weights_grad) {
      finish_kernel<acc_t><<<nt, kThreads, 0, stream>>>(partials.const_data_ptr<acc_t>(), blocks, nt,
                                                       grad_w.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (want_gx) {
      grad_x_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
          bw.grad.const_data_ptr<scalar_t>(), argp, K, pf, bw.w.const_data_ptr<acc_t>(),
          bw.grad_x.mutable_data_ptr<scalar_t>(), n, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {bw.grad_ys, bw.grad_x, grad_w.to(weights.scalar_type())};
}

TORCH_LIBRARY_IMPL(gaea, CUDA, m) {
  m.impl("mixed_op_pf", &mixed_op_pf_cuda);
  m.impl("mixed_op_pf_backward", &mixed_op_pf_backward_cuda);
}

}  // namespace gaea
