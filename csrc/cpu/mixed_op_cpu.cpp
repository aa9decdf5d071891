// CPU mixed op. Forward moves (K+1)·N elements, backward at most (2K+1)·N, with 2 FLOPs per
// element per candidate. Once the inputs sit in cache the loops are instruction-bound, so
// float/double keep a register block of accumulators across all K inputs (one load per input
// element, nothing re-read from a buffer) and run an AVX2+FMA build where the CPU has it.
// Half types convert through a float tile. Work is split into fixed chunks, never per-thread
// ranges, so every element and every partial sum is computed the same way for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../common.h"
#include "../ops.h"
#include "simd.h"

namespace gaea {
namespace {

constexpr int64_t kChunk = 16384;  // elements per task: a multiple of every block size below
constexpr int kUnroll = 4;         // vectors per block: 128 bytes of each input per step

template <typename T>
constexpr bool kSimd = std::is_same_v<T, float> || std::is_same_v<T, double>;

// ---- float / double: register-blocked vector code -------------------------------------

template <typename T>
inline __attribute__((always_inline)) void fwd_simd(const T* const* ys, const T* w, int64_t K,
                                                    T* out, int64_t b, int64_t e) {
  using V = vec_t<T>;
  constexpr int L = Vec32<T>::lanes, S = L * kUnroll;
  int64_t i = b;
  for (; i + S <= e; i += S) {
    V a[kUnroll];
    const V w0 = vsplat(w[0]);
    for (int u = 0; u < kUnroll; ++u) a[u] = w0 * vload(ys[0] + i + u * L);
    for (int64_t k = 1; k < K; ++k) {
      const V wk = vsplat(w[k]);
      const T* y = ys[k] + i;
      for (int u = 0; u < kUnroll; ++u) a[u] += wk * vload(y + u * L);
    }
    for (int u = 0; u < kUnroll; ++u) vstore(out + i + u * L, a[u]);
  }
  for (; i < e; ++i) {
    T acc = w[0] * ys[0][i];
    for (int64_t k = 1; k < K; ++k) acc += w[k] * ys[k][i];
    out[i] = acc;
  }
}

// Adds this range's sum(g * ys[k]) to dot[k] (vector lanes) and writes gys[k] = w[k] * g,
// loading each element of g once for all K candidates.
template <typename T>
inline __attribute__((always_inline)) void bwd_simd(const T* g, const T* const* ys, const T* w,
                                                    T* const* gys, int64_t K, int64_t b, int64_t e,
                                                    bool dots, vec_t<T>* dot, T* tail) {
  using V = vec_t<T>;
  constexpr int L = Vec32<T>::lanes, S = L * kUnroll;
  int64_t i = b;
  for (; i + S <= e; i += S) {
    V gv[kUnroll];
    for (int u = 0; u < kUnroll; ++u) gv[u] = vload(g + i + u * L);
    for (int64_t k = 0; k < K; ++k) {
      if (dots) {
        const T* y = ys[k] + i;
        V d = gv[0] * vload(y);
        for (int u = 1; u < kUnroll; ++u) d += gv[u] * vload(y + u * L);
        dot[k] += d;
      }
      if (T* gy = gys[k]) {
        const V wk = vsplat(w[k]);
        for (int u = 0; u < kUnroll; ++u) vstore(gy + i + u * L, wk * gv[u]);
      }
    }
  }
  for (; i < e; ++i)
    for (int64_t k = 0; k < K; ++k) {
      if (dots) tail[k] += g[i] * ys[k][i];
      if (gys[k]) gys[k][i] = w[k] * g[i];
    }
}

template <typename T>
GAEA_TARGET_AVX2 void fwd_avx2(const T* const* ys, const T* w, int64_t K, T* out, int64_t b, int64_t e) {
  fwd_simd<T>(ys, w, K, out, b, e);
}
template <typename T>
void fwd_base(const T* const* ys, const T* w, int64_t K, T* out, int64_t b, int64_t e) {
  fwd_simd<T>(ys, w, K, out, b, e);
}
template <typename T>
GAEA_TARGET_AVX2 void bwd_avx2(const T* g, const T* const* ys, const T* w, T* const* gys, int64_t K,
                               int64_t b, int64_t e, bool dots, vec_t<T>* dot, T* tail) {
  bwd_simd<T>(g, ys, w, gys, K, b, e, dots, dot, tail);
}
template <typename T>
void bwd_base(const T* g, const T* const* ys, const T* w, T* const* gys, int64_t K, int64_t b,
              int64_t e, bool dots, vec_t<T>* dot, T* tail) {
  bwd_simd<T>(g, ys, w, gys, K, b, e, dots, dot, tail);
}

// ---- half / bfloat16: convert through a float tile ------------------------------------

constexpr int64_t kTile = 1024;

template <typename T>
void fwd_tiled(const T* const* ys, const float* w, int64_t K, T* out, int64_t b, int64_t e) {
  float buf[kTile];
  for (int64_t t = b; t < e; t += kTile) {
    const int64_t m = std::min(kTile, e - t);
    for (int64_t i = 0; i < m; ++i) buf[i] = w[0] * static_cast<float>(ys[0][t + i]);
    for (int64_t k = 1; k < K; ++k)
      for (int64_t i = 0; i < m; ++i) buf[i] += w[k] * static_cast<float>(ys[k][t + i]);
    for (int64_t i = 0; i < m; ++i) out[t + i] = static_cast<T>(buf[i]);
  }
}

template <typename T>
void bwd_tiled(const T* g, const T* const* ys, const float* w, T* const* gys, int64_t K, int64_t b,
               int64_t e, bool dots, float* dot) {
  float gbuf[kTile];
  for (int64_t t = b; t < e; t += kTile) {
    const int64_t m = std::min(kTile, e - t);
    for (int64_t i = 0; i < m; ++i) gbuf[i] = static_cast<float>(g[t + i]);
    for (int64_t k = 0; k < K; ++k) {
      if (T* gy = gys[k])
        for (int64_t i = 0; i < m; ++i) gy[t + i] = static_cast<T>(w[k] * gbuf[i]);
      if (!dots) continue;
      float acc[16] = {};  // independent lanes: vectorizable without reassociating
      int64_t i = 0;
      for (; i + 16 <= m; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += gbuf[i + j] * static_cast<float>(ys[k][t + i + j]);
      for (int j = 0; i < m; ++i, ++j) acc[j] += gbuf[i] * static_cast<float>(ys[k][t + i]);
      for (int width = 8; width > 0; width /= 2)
        for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
      dot[k] += acc[0];
    }
  }
}

// ---- drivers ------------------------------------------------------------------------

template <typename T>
void forward(const std::vector<const T*>& ys, const at::opmath_type<T>* w, T* out, int64_t n) {
  const int64_t K = static_cast<int64_t>(ys.size());
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    const int64_t b = cb * kChunk, e = std::min(n, ce * kChunk);
    if constexpr (kSimd<T>) {
      for (int64_t c = b; c < e; c += kChunk) {
        const int64_t stop = std::min(e, c + kChunk);
        cpu_has_avx2() ? fwd_avx2<T>(ys.data(), w, K, out, c, stop) : fwd_base<T>(ys.data(), w, K, out, c, stop);
      }
    } else {
      fwd_tiled<T>(ys.data(), w, K, out, b, e);
    }
  });
}

// partials[c * K + k]: candidate k's dot product over chunk c.
template <typename T>
void backward(const T* g, const std::vector<const T*>& ys, const at::opmath_type<T>* w,
              const std::vector<T*>& gys, bool dots, at::opmath_type<T>* partials, int64_t n) {
  using acc_t = at::opmath_type<T>;
  const int64_t K = static_cast<int64_t>(ys.size());
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<acc_t> tail(K);
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
      std::fill(tail.begin(), tail.end(), acc_t(0));
      if constexpr (kSimd<T>) {
        std::vector<vec_t<T>> dot(K, vec_t<T>{});
        cpu_has_avx2() ? bwd_avx2<T>(g, ys.data(), w, gys.data(), K, b, e, dots, dot.data(), tail.data())
                       : bwd_base<T>(g, ys.data(), w, gys.data(), K, b, e, dots, dot.data(), tail.data());
        for (int64_t k = 0; k < K; ++k) {
          acc_t s = 0;  // lanes summed in a fixed order
          for (int j = 0; j < Vec32<T>::lanes; ++j) s += dot[k][j];
          partials[c * K + k] = s + tail[k];
        }
      } else {
        bwd_tiled<T>(g, ys.data(), w, gys.data(), K, b, e, dots, tail.data());
        for (int64_t k = 0; k < K; ++k) partials[c * K + k] = tail[k];
      }
    }
  });
}

}  // namespace

at::Tensor mixed_op_cpu(at::TensorList ys_in, const at::Tensor& weights) {
  const MixedForward f = prepare_forward(ys_in, weights);
  const auto& ys = f.ys;
  const at::Tensor& w = f.w;
  const at::Tensor& out = f.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mixed_op_cpu", [&] {
    std::vector<const scalar_t*> ptrs;
    for (const auto& y : ys) ptrs.push_back(y.const_data_ptr<scalar_t>());
    forward<scalar_t>(ptrs, w.const_data_ptr<at::opmath_type<scalar_t>>(), out.mutable_data_ptr<scalar_t>(),
                      out.numel());
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_backward_cpu(
    const at::Tensor& grad_in, at::TensorList ys_in, const at::Tensor& weights,
    const c10::List<bool>& ys_mask, bool weights_grad) {
  const MixedBackward bw = prepare_backward(grad_in, ys_in, weights, ys_mask);
  const auto& ys = bw.ys;
  const at::Tensor& w = bw.w;
  const at::Tensor& grad = bw.grad;
  const auto& grad_ys = bw.grad_ys;
  const int64_t K = static_cast<int64_t>(ys.size());
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
    backward<scalar_t>(grad.const_data_ptr<scalar_t>(), yp, w.const_data_ptr<acc_t>(), gp, weights_grad,
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
