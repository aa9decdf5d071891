// CPU mixed op whose parameter-free candidates (skip, 3x3 avg / max pool, stride 1, pad 1)
// are computed from the edge input x instead of being materialized by the caller.
//
// Traffic, per element of x, with K parametric candidates (NB201: K = 2 convs, pf = skip +
// avg pool, so the unfused path moves 4 candidate tensors where this one moves 3):
//   forward   reads x and K ys, writes out                           (K + 2) elements
//   backward  reads grad, x (only for weight grads or max pool) and K ys (only for weight
//             grads), writes K grad_ys and grad_x                     at most 2K + 3
// versus the unfused edge: the pool's own pass (read x, write the pooled copy), mixed_op over
// K + 2 inputs, the pool's backward (read, write) and one more gradient for autograd to add
// into x's. The pooled tensor is also never saved for backward.
//
// NB201 search (C=16, N=5, batch 64, 32x32, float32): 30 edges per stage with x of 4, 2 and
// 1 MiB, so one "x-sized tensor on every edge" is 30 * 7 MiB = 210 MiB. Per edge, counted in
// x-sized tensors moved (fwd / bwd, bwd including autograd's adds into x's gradient):
//   unfused: avg pool 2 + mixed_op(4 inputs) 5      = 7  /  mixed_op 9 + pool 2 + 3 adds 9 = 20
//   fused:   mixed_op_pf(x, 2 conv outputs) 4        = 4  /  7 + 2 adds 6                  = 13
// i.e. 3 * 210 = 630 MiB less forward and 7 * 210 = 1470 MiB less backward traffic per pass,
// and 210 MiB (the 90 pooled tensors) fewer saved activations. Predicted before measuring:
// saved activations 1604 -> ~1394 MiB (0.87x); step time down by ~2.8 s of ~6.3 s on the
// 2-core CPU, since ATen's NCHW avg_pool2d and its backward run at ~0.2-0.3 GB/s there
// (~35 ms per stage-1 edge vs ~7-10 ms for this op, measured per edge), i.e. ~1.5-1.8x.
//
// Work unit: one image, i.e. one (b, c) plane (NCHW) or one b (channels_last; pixels of C
// interleaved values), processed in per-thread scratch buffers in the accumulation type: the
// plane is converted once, the 3x3 window sums / maxima are separable (a row pass, then a
// pass over three rows), and every other loop is a flat, vectorizable pass over the image.
// Images are grouped into fixed chunks (never per-thread ranges) and the weight-gradient
// partial of each chunk is kept separately, then summed in chunk order: results are the same
// bits for any thread count. The max-pool gradient is a scatter; it is done serially within
// an image, in element order, into the image's scratch buffer, so it is deterministic too.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common.h"
#include "../ops.h"
#include "simd.h"

#define GAEA_AI inline __attribute__((always_inline))

namespace gaea {
namespace {

constexpr int64_t kChunkElems = 4096;  // images per task: at least this many elements
constexpr int kLanes = 16;             // independent dot-product accumulators

struct Geo {
  int64_t H, W, P, RL, N;  // RL: elements per image row; N: elements per image
};

// PyTorch's max-pool rule (CPU and CUDA kernels): scanning the window in row-major order, a
// value replaces the running max if it is greater or NaN, so ties keep the first maximum
// and a NaN, once seen, is replaced only by a later NaN.
template <typename acc_t>
GAEA_AI bool takes(acc_t v, acc_t m) {
  return v > m || v != v;
}

// ---- 3x3 windows, separable: a pass along rows, then one across rows ---------------------
// Every pass is one flat loop over the image (vectorizable however narrow the rows are),
// then a fix-up of the elements whose window is clipped: the first and last pixel of each
// row, the first and last row.

template <typename acc_t>
GAEA_AI void hsum(const acc_t* s, acc_t* d, const Geo& g) {
  const int64_t P = g.P, N = g.N;
  if (g.W == 1) {
    for (int64_t i = 0; i < N; ++i) d[i] = s[i];
    return;
  }
  for (int64_t i = P; i < N - P; ++i) d[i] = (s[i - P] + s[i]) + s[i + P];
  for (int64_t b = 0; b < N; b += g.RL) {
    for (int64_t i = b; i < b + P; ++i) d[i] = s[i] + s[i + P];
    for (int64_t i = b + g.RL - P; i < b + g.RL; ++i) d[i] = s[i - P] + s[i];
  }
}

template <typename acc_t>
GAEA_AI void vsum(const acc_t* t, acc_t* d, const Geo& g) {
  const int64_t R = g.RL, N = g.N;
  if (g.H == 1) {
    for (int64_t i = 0; i < N; ++i) d[i] = t[i];
    return;
  }
  for (int64_t i = 0; i < R; ++i) d[i] = t[i] + t[i + R];
  for (int64_t i = R; i < N - R; ++i) d[i] = (t[i - R] + t[i]) + t[i + R];
  for (int64_t i = N - R; i < N; ++i) d[i] = t[i - R] + t[i];
}

// dst = sum of src over each element's 3x3 window clipped to the image. tmp: scratch of N.
template <typename acc_t>
GAEA_AI void box_sum(const acc_t* src, acc_t* tmp, acc_t* dst, const Geo& g) {
  hsum(src, tmp, g);
  vsum(tmp, dst, g);
}

// d /= number of in-image elements of each element's window (count_include_pad=False),
// divided rather than multiplied by a reciprocal to round as PyTorch's avg_pool2d does.
template <typename acc_t>
GAEA_AI void divide_by_count(acc_t* d, const acc_t* count, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] /= count[i];
}

// Max pool. Separable is exact for the rule in takes(): the first maximum of the row-major
// scan is the first maximum of the first row whose maximum is largest, and the last NaN is
// the last NaN of the last row holding one. With kArgs the winner is recorded as the
// neighbour code (dy + 1) * 3 + (dx + 1); the row pass records dx + 1 in targ.
template <typename acc_t, bool kArgs>
GAEA_AI void hmax(const acc_t* s, acc_t* d, int8_t* a, const Geo& g) {
  const int64_t P = g.P, N = g.N;
  if (g.W == 1) {
    for (int64_t i = 0; i < N; ++i) d[i] = s[i];
    if constexpr (kArgs) std::fill(a, a + N, int8_t(1));
    return;
  }
  for (int64_t i = P; i < N - P; ++i) {
    acc_t m = s[i - P];
    int8_t c = 0;
    if (takes(s[i], m)) m = s[i], c = 1;
    if (takes(s[i + P], m)) m = s[i + P], c = 2;
    d[i] = m;
    if constexpr (kArgs) a[i] = c;
  }
  for (int64_t b = 0; b < N; b += g.RL) {
    for (int64_t i = b; i < b + P; ++i) {
      const bool t = takes(s[i + P], s[i]);
      d[i] = t ? s[i + P] : s[i];
      if constexpr (kArgs) a[i] = t ? 2 : 1;
    }
    for (int64_t i = b + g.RL - P; i < b + g.RL; ++i) {
      const bool t = takes(s[i], s[i - P]);
      d[i] = t ? s[i] : s[i - P];
      if constexpr (kArgs) a[i] = t ? 1 : 0;
    }
  }
}

// Rows [b, e) of the across-rows pass, whose windows span row offsets dy0..dy1.
template <typename acc_t, bool kArgs, int dy0, int dy1>
GAEA_AI void vmax_rows(const acc_t* t, const int8_t* ta, acc_t* d, int8_t* code, int64_t R, int64_t b,
                       int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    acc_t m = t[i + dy0 * R];
    int8_t c = 0;
    if constexpr (kArgs) c = static_cast<int8_t>((dy0 + 1) * 3 + ta[i + dy0 * R]);
    for (int dy = dy0 + 1; dy <= dy1; ++dy) {
      const acc_t v = t[i + dy * R];
      if (takes(v, m)) {
        m = v;
        if constexpr (kArgs) c = static_cast<int8_t>((dy + 1) * 3 + ta[i + dy * R]);
      }
    }
    d[i] = m;
    if constexpr (kArgs) code[i] = c;
  }
}

template <typename acc_t, bool kArgs>
GAEA_AI void vmax(const acc_t* t, const int8_t* ta, acc_t* d, int8_t* code, const Geo& g) {
  const int64_t R = g.RL, N = g.N;
  if (g.H == 1) return vmax_rows<acc_t, kArgs, 0, 0>(t, ta, d, code, R, 0, N);
  vmax_rows<acc_t, kArgs, 0, 1>(t, ta, d, code, R, 0, R);
  vmax_rows<acc_t, kArgs, -1, 1>(t, ta, d, code, R, R, N - R);
  vmax_rows<acc_t, kArgs, -1, 0>(t, ta, d, code, R, N - R, N);
}

// dst = max of src over each 3x3 window; with kArgs, code = where that max came from.
template <typename acc_t, bool kArgs>
GAEA_AI void box_max(const acc_t* src, acc_t* tmp, int8_t* targ, acc_t* dst, int8_t* code, const Geo& g) {
  hmax<acc_t, kArgs>(src, tmp, targ, g);
  vmax<acc_t, kArgs>(tmp, targ, dst, code, g);
}

// ---- small flat passes ------------------------------------------------------------------

// sum(a * b) with kLanes independent accumulators combined in a fixed tree.
template <typename acc_t, typename B>
GAEA_AI acc_t dot(const acc_t* a, const B* b, int64_t n) {
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * static_cast<acc_t>(b[i + j]);
  for (int j = 0; i < n; ++i, ++j) acc[j] += a[i] * static_cast<acc_t>(b[i]);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  return acc[0];
}

// o = w * t (first term) or o += w * t.
template <typename acc_t, typename B>
GAEA_AI void axpy(acc_t* o, acc_t w, const B* t, int64_t n, bool first) {
  if (first) {
    for (int64_t i = 0; i < n; ++i) o[i] = w * static_cast<acc_t>(t[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) o[i] += w * static_cast<acc_t>(t[i]);
  }
}

// ---- per-image kernels --------------------------------------------------------------------

template <typename acc_t>
struct Scratch {
  std::vector<acc_t> buf;
  std::vector<int8_t> codes;
  acc_t *xa, *ga, *tmp, *avg, *mx, *o, *gs, *gm;
  int8_t *targ, *code;
  explicit Scratch(int64_t n) : buf(8 * n), codes(2 * n) {
    acc_t* p = buf.data();
    for (acc_t** q : {&xa, &ga, &tmp, &avg, &mx, &o, &gs, &gm}) *q = p, p += n;
    targ = codes.data();
    code = codes.data() + n;
  }
};

struct PfFlags {
  bool avg = false, max = false;
};

PfFlags flags_of(const std::vector<int64_t>& pf) {
  PfFlags f;
  for (int64_t c : pf) f.avg |= c == kPfAvgPool, f.max |= c == kPfMaxPool;
  return f;
}

template <typename T, typename acc_t>
struct Args {
  const T* x;
  const T* const* ys;  // K pointers
  int64_t K;
  const int64_t* pf;
  int64_t npf;
  const acc_t* w;  // K + npf
  Geo g;
  const acc_t* count;  // [N]: elements in each element's 3x3 window (avg pool only)
  // forward
  T* out;
  // backward
  const T* grad;
  T* const* gys;  // K pointers, null where not wanted
  T* gx;          // null unless wanted
  bool dots;
  acc_t* partials;  // [chunk, K + npf]
};

template <typename acc_t>
GAEA_AI const acc_t* pf_term(int64_t code, const Scratch<acc_t>& s) {
  return code == kPfSkip ? s.xa : code == kPfAvgPool ? s.avg : s.mx;
}

template <typename T, typename acc_t>
GAEA_AI void forward_images(const Args<T, acc_t>& a, PfFlags f, int64_t ib, int64_t ie, Scratch<acc_t>& s) {
  const Geo& g = a.g;
  const int64_t N = g.N;
  for (int64_t img = ib; img < ie; ++img) {
    const int64_t off = img * N;
    if (a.npf > 0)
      for (int64_t i = 0; i < N; ++i) s.xa[i] = static_cast<acc_t>(a.x[off + i]);
    if (f.avg) {
      box_sum(s.xa, s.tmp, s.avg, g);
      divide_by_count(s.avg, a.count, N);
    }
    if (f.max) box_max<acc_t, false>(s.xa, s.tmp, nullptr, s.mx, nullptr, g);
    // Candidates in weight order: ys, then pf.
    for (int64_t k = 0; k < a.K; ++k) axpy(s.o, a.w[k], a.ys[k] + off, N, k == 0);
    for (int64_t j = 0; j < a.npf; ++j) axpy(s.o, a.w[a.K + j], pf_term(a.pf[j], s), N, a.K + j == 0);
    T* out = a.out + off;
    for (int64_t i = 0; i < N; ++i) out[i] = static_cast<T>(s.o[i]);
  }
}

template <typename T, typename acc_t>
GAEA_AI void backward_images(const Args<T, acc_t>& a, PfFlags f, int64_t ib, int64_t ie, acc_t* part,
                             Scratch<acc_t>& s) {
  const Geo& g = a.g;
  const int64_t N = g.N;
  const bool need_x = a.npf > 0 && (a.dots || (a.gx != nullptr && f.max));
  for (int64_t img = ib; img < ie; ++img) {
    const int64_t off = img * N;
    for (int64_t i = 0; i < N; ++i) s.ga[i] = static_cast<acc_t>(a.grad[off + i]);
    for (int64_t k = 0; k < a.K; ++k)
      if (T* gy = a.gys[k]) {
        const acc_t wk = a.w[k];
        for (int64_t i = 0; i < N; ++i) gy[off + i] = static_cast<T>(wk * s.ga[i]);
      }
    if (need_x) {
      for (int64_t i = 0; i < N; ++i) s.xa[i] = static_cast<acc_t>(a.x[off + i]);
      if (f.avg && a.dots) {
        box_sum(s.xa, s.tmp, s.avg, g);
        divide_by_count(s.avg, a.count, N);
      }
      if (f.max) {
        if (a.gx != nullptr)
          box_max<acc_t, true>(s.xa, s.tmp, s.targ, s.mx, s.code, g);
        else
          box_max<acc_t, false>(s.xa, s.tmp, nullptr, s.mx, nullptr, g);
      }
    }
    if (a.dots) {
      for (int64_t k = 0; k < a.K; ++k) part[k] += dot(s.ga, a.ys[k] + off, N);
      for (int64_t j = 0; j < a.npf; ++j) part[a.K + j] += dot(s.ga, pf_term(a.pf[j], s), N);
    }
    if (a.gx == nullptr) continue;
    // grad_x = sum_j w_j * (pf_j's vector-Jacobian product with grad), in pf order.
    for (int64_t j = 0; j < a.npf; ++j) {
      const acc_t wj = a.w[a.K + j];
      const bool first = j == 0;
      if (a.pf[j] == kPfSkip) {
        axpy(s.o, wj, s.ga, N, first);
      } else if (a.pf[j] == kPfAvgPool) {
        // The avg pool's gradient is a gather: the windows holding an element are the
        // element's own 3x3 window, so it is box_sum(grad / count).
        for (int64_t i = 0; i < N; ++i) s.gs[i] = s.ga[i] / a.count[i];
        box_sum(s.gs, s.tmp, s.gm, g);
        axpy(s.o, wj, s.gm, N, first);
      } else {
        std::fill(s.gm, s.gm + N, acc_t(0));
        for (int64_t q = 0; q < N; ++q) {
          const int c = s.code[q];
          s.gm[q + (c / 3 - 1) * g.RL + (c % 3 - 1) * g.P] += s.ga[q];
        }
        axpy(s.o, wj, s.gm, N, first);
      }
    }
    T* gx = a.gx + off;
    for (int64_t i = 0; i < N; ++i) gx[i] = static_cast<T>(s.o[i]);
  }
}

// Baseline-ISA and AVX2+FMA builds of the same bodies, chosen at run time (see simd.h).
template <typename T, typename acc_t>
GAEA_TARGET_AVX2 void forward_avx2(const Args<T, acc_t>& a, PfFlags f, int64_t ib, int64_t ie, Scratch<acc_t>& s) {
  forward_images(a, f, ib, ie, s);
}
template <typename T, typename acc_t>
void forward_base(const Args<T, acc_t>& a, PfFlags f, int64_t ib, int64_t ie, Scratch<acc_t>& s) {
  forward_images(a, f, ib, ie, s);
}
template <typename T, typename acc_t>
GAEA_TARGET_AVX2 void backward_avx2(const Args<T, acc_t>& a, PfFlags f, int64_t ib, int64_t ie, acc_t* part,
                                    Scratch<acc_t>& s) {
  backward_images(a, f, ib, ie, part, s);
}
template <typename T, typename acc_t>
void backward_base(const Args<T, acc_t>& a, PfFlags f, int64_t ib, int64_t ie, acc_t* part, Scratch<acc_t>& s) {
  backward_images(a, f, ib, ie, part, s);
}

Geo geo_of(const PfGeometry& p) {
  return Geo{p.H, p.W, p.P, p.W * p.P, p.H * p.W * p.P};
}

// Window sizes of one image: (rows in the window) * (columns in the window), per element.
template <typename acc_t>
std::vector<acc_t> window_counts(const Geo& g, bool needed) {
  std::vector<acc_t> c(needed ? g.N : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(c.size()); ++i) {
    const int64_t pix = i / g.P, h = pix / g.W, w = pix % g.W;
    c[i] = acc_t((1 + (h > 0) + (h < g.H - 1)) * (1 + (w > 0) + (w < g.W - 1)));
  }
  return c;
}

int64_t images_per_chunk(const Geo& g) {
  return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(g.N, 1));
}

}  // namespace

at::Tensor mixed_op_pf_cpu(const at::Tensor& x_in, at::TensorList ys_in, const at::Tensor& weights,
                           at::IntArrayRef pf_in) {
  const PfForward fw = prepare_pf_forward(x_in, ys_in, weights, pf_in);
  const Geo g = geo_of(fw.geo);
  if (fw.out.numel() == 0) return fw.out;
  const PfFlags f = flags_of(fw.pf);
  const int64_t per = images_per_chunk(g);
  const int64_t nchunks = (fw.geo.images + per - 1) / per;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fw.out.scalar_type(), "mixed_op_pf_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> yp;
    for (const auto& y : fw.ys) yp.push_back(y.const_data_ptr<scalar_t>());
    Args<scalar_t, acc_t> a{};
    a.x = fw.x.const_data_ptr<scalar_t>();
    a.ys = yp.data();
    a.K = static_cast<int64_t>(yp.size());
    a.pf = fw.pf.data();
    a.npf = static_cast<int64_t>(fw.pf.size());
    a.w = fw.w.const_data_ptr<acc_t>();
    a.g = g;
    a.out = fw.out.mutable_data_ptr<scalar_t>();
    const auto count = window_counts<acc_t>(g, f.avg);
    a.count = count.data();
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      Scratch<acc_t> s(g.N);
      const int64_t ib = cb * per, ie = std::min(fw.geo.images, ce * per);
      cpu_has_avx2() ? forward_avx2(a, f, ib, ie, s) : forward_base(a, f, ib, ie, s);
    });
  });
  return fw.out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> mixed_op_pf_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, at::TensorList ys_in, const at::Tensor& weights,
    at::IntArrayRef pf_in, const c10::List<bool>& ys_mask, bool x_grad, bool weights_grad) {
  const PfBackward bw = prepare_pf_backward(grad_in, x_in, ys_in, weights, pf_in, ys_mask, x_grad);
  const Geo g = geo_of(bw.geo);
  const int64_t K = static_cast<int64_t>(bw.ys.size());
  const int64_t KP = K + static_cast<int64_t>(bw.pf.size());
  const int64_t per = images_per_chunk(g);
  const int64_t nchunks = g.N == 0 ? 0 : (bw.geo.images + per - 1) / per;
  const bool want_gx = bw.grad_x.numel() > 0;
  at::Tensor partials = at::zeros({weights_grad ? nchunks : 0, KP}, bw.w.options());
  const PfFlags f = flags_of(bw.pf);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bw.grad.scalar_type(), "mixed_op_pf_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> yp;
    std::vector<scalar_t*> gp;
    for (int64_t k = 0, j = 0; k < K; ++k) {
      yp.push_back(bw.ys[k].const_data_ptr<scalar_t>());
      gp.push_back(ys_mask.get(k) ? bw.grad_ys[j++].mutable_data_ptr<scalar_t>() : nullptr);
    }
    Args<scalar_t, acc_t> a{};
    a.x = bw.x.const_data_ptr<scalar_t>();
    a.ys = yp.data();
    a.K = K;
    a.pf = bw.pf.data();
    a.npf = static_cast<int64_t>(bw.pf.size());
    a.w = bw.w.const_data_ptr<acc_t>();
    a.g = g;
    a.grad = bw.grad.const_data_ptr<scalar_t>();
    a.gys = gp.data();
    a.gx = want_gx ? bw.grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    a.dots = weights_grad;
    const auto count = window_counts<acc_t>(g, f.avg);
    a.count = count.data();
    acc_t* parts = partials.mutable_data_ptr<acc_t>();
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      Scratch<acc_t> s(g.N);
      std::vector<acc_t> dummy(KP);
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t ib = c * per, ie = std::min(bw.geo.images, ib + per);
        acc_t* part = weights_grad ? parts + c * KP : dummy.data();
        cpu_has_avx2() ? backward_avx2(a, f, ib, ie, part, s) : backward_base(a, f, ib, ie, part, s);
      }
    });
  });
  // Finishing pass: chunk partials summed in chunk order (not at::sum, whose order may
  // depend on the thread count).
  at::Tensor grad_w = at::zeros({KP}, bw.w.options());
  AT_DISPATCH_FLOATING_TYPES(grad_w.scalar_type(), "mixed_op_pf_finish_cpu", [&] {
    const scalar_t* p = partials.const_data_ptr<scalar_t>();
    scalar_t* gw = grad_w.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < partials.size(0); ++c)
      for (int64_t k = 0; k < KP; ++k) gw[k] += p[c * KP + k];
  });
  return {bw.grad_ys, bw.grad_x, grad_w.to(weights.scalar_type())};
}

TORCH_LIBRARY_IMPL(gaea, CPU, m) {
  m.impl("mixed_op_pf", &mixed_op_pf_cpu);
  m.impl("mixed_op_pf_backward", &mixed_op_pf_backward_cpu);
}

}  // namespace gaea
