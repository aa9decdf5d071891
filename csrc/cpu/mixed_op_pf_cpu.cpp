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
#include <cmath>
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
  const acc_t* w;  // K + Z + npf: ys, then zs, then pf
  // mixed_op_bn: Z inputs of BatchNorm(affine=False) and their statistics
  const T* const* zs;   // Z pointers
  int64_t Z;
  const acc_t* stats;   // [Z, 2, C]: mean, invstd
  BnChannels ch;
  Geo g;
  const acc_t* count;  // [N]: elements in each element's 3x3 window (avg pool only)
  // forward
  T* out;
  // backward
  const T* grad;
  T* const* gys;  // K pointers, null where not wanted
  T* gx;          // null unless wanted
  T* const* gzs;  // Z pointers, null where not wanted
  const acc_t* gmean;  // [C]: sum of grad over the channel / M
  const acc_t* gcoef;  // [Z, C]: invstd_j * sum(grad * (z_j - mean_j)) / M
  bool dots;
  acc_t* partials;  // [chunk, K + npf]
};

template <typename acc_t>
GAEA_AI const acc_t* pf_term(int64_t code, const Scratch<acc_t>& s) {
  return code == kPfSkip ? s.xa : code == kPfAvgPool ? s.avg : s.mx;
}

// ---- BatchNorm terms: per-channel constants over one image's flat range -----------------
// An image is whole pixels (channels_last: C interleaved channels each) or a run of
// (N, C, S)-ordered elements, so a channel is constant over runs of at most S elements.

// Calls f(i, e, c) for the runs [i, e) of image elements (flat offset off) in channel c,
// contiguous layouts only.
template <typename F>
GAEA_AI void channel_runs(int64_t off, int64_t N, const BnChannels& ch, F&& f) {
  for (int64_t i = 0; i < N;) {
    const int64_t q = (off + i) / ch.S;
    const int64_t e = std::min(N, (q + 1) * ch.S - off);
    f(i, e, q % ch.C);
    i = e;
  }
}

// o (+)= w * (z - mean) * invstd, o the image's accumulator, z the tensor's base pointer.
template <typename T, typename acc_t>
GAEA_AI void bn_axpy(acc_t* o, acc_t w, const T* z, const acc_t* mean, const acc_t* invstd, int64_t off,
                     int64_t N, const BnChannels& ch, bool first) {
  z += off;
  if (ch.cl) {
    const int64_t C = ch.C;
    for (int64_t p = 0; p < N; p += C)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = w * ((static_cast<acc_t>(z[p + c]) - mean[c]) * invstd[c]);
        o[p + c] = first ? v : o[p + c] + v;
      }
    return;
  }
  channel_runs(off, N, ch, [&](int64_t i, int64_t e, int64_t c) {
    const acc_t m = mean[c], s = invstd[c];
    if (first)
      for (; i < e; ++i) o[i] = w * ((static_cast<acc_t>(z[i]) - m) * s);
    else
      for (; i < e; ++i) o[i] += w * ((static_cast<acc_t>(z[i]) - m) * s);
  });
}

// Per-channel sums of one image into row ([1 + Z, C]): sum(g), sum(g * (z_j - mean_j)).
template <typename T, typename acc_t>
GAEA_AI void bn_reduce(const acc_t* ga, const Args<T, acc_t>& a, int64_t off, int64_t N, acc_t* row) {
  const BnChannels& ch = a.ch;
  const int64_t C = ch.C;
  if (ch.cl) {
    for (int64_t p = 0; p < N; p += C)
      for (int64_t c = 0; c < C; ++c) row[c] += ga[p + c];
    for (int64_t j = 0; j < a.Z; ++j) {
      const T* z = a.zs[j] + off;
      const acc_t* mean = a.stats + j * 2 * C;
      acc_t* r = row + (1 + j) * C;
      for (int64_t p = 0; p < N; p += C)
        for (int64_t c = 0; c < C; ++c) r[c] += ga[p + c] * (static_cast<acc_t>(z[p + c]) - mean[c]);
    }
    return;
  }
  channel_runs(off, N, ch, [&](int64_t i, int64_t e, int64_t c) {
    acc_t lanes[kLanes] = {};
    int64_t q = i;
    for (; q + kLanes <= e; q += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes[l] += ga[q + l];
    for (int l = 0; q < e; ++q, ++l) lanes[l] += ga[q];
    for (int width = kLanes / 2; width > 0; width /= 2)
      for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    row[c] += lanes[0];
    for (int64_t j = 0; j < a.Z; ++j) {
      const T* z = a.zs[j] + off;
      const acc_t m = a.stats[j * 2 * C + c];
      acc_t acc[kLanes] = {};
      q = i;
      for (; q + kLanes <= e; q += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] += ga[q + l] * (static_cast<acc_t>(z[q + l]) - m);
      for (int l = 0; q < e; ++q, ++l) acc[l] += ga[q] * (static_cast<acc_t>(z[q]) - m);
      for (int width = kLanes / 2; width > 0; width /= 2)
        for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
      row[(1 + j) * C + c] += acc[0];
    }
  });
}

// grad_z = w * invstd * (g - mean(g) - y * mean(g * y)), y = (z - mean) * invstd recomputed:
// the batch-norm backward of grad_y = w * g, with the channel means from bn_reduce.
template <typename T, typename acc_t>
GAEA_AI void bn_grad(const acc_t* ga, const Args<T, acc_t>& a, int64_t j, int64_t off, int64_t N) {
  const BnChannels& ch = a.ch;
  const int64_t C = ch.C;
  const acc_t w = a.w[a.K + j];
  const acc_t* mean = a.stats + j * 2 * C;
  const acc_t* invstd = mean + C;
  const acc_t* coef = a.gcoef + j * C;
  const T* z = a.zs[j] + off;
  T* gz = a.gzs[j] + off;
  if (ch.cl) {
    for (int64_t p = 0; p < N; p += C)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t y = (static_cast<acc_t>(z[p + c]) - mean[c]) * invstd[c];
        gz[p + c] = static_cast<T>((w * invstd[c]) * (ga[p + c] - a.gmean[c] - y * coef[c]));
      }
    return;
  }
  channel_runs(off, N, ch, [&](int64_t i, int64_t e, int64_t c) {
    const acc_t m = mean[c], s = invstd[c], ws = w * s, gm = a.gmean[c], k = coef[c];
    for (; i < e; ++i) gz[i] = static_cast<T>(ws * (ga[i] - gm - ((static_cast<acc_t>(z[i]) - m) * s) * k));
  });
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
    // Candidates in weight order: ys, then zs, then pf.
    for (int64_t k = 0; k < a.K; ++k) axpy(s.o, a.w[k], a.ys[k] + off, N, k == 0);
    for (int64_t j = 0; j < a.Z; ++j) {
      const acc_t* mean = a.stats + j * 2 * a.ch.C;
      bn_axpy(s.o, a.w[a.K + j], a.zs[j], mean, mean + a.ch.C, off, N, a.ch, a.K + j == 0);
    }
    const int64_t KZ = a.K + a.Z;
    for (int64_t j = 0; j < a.npf; ++j) axpy(s.o, a.w[KZ + j], pf_term(a.pf[j], s), N, KZ + j == 0);
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
    for (int64_t j = 0; j < a.Z; ++j)
      if (a.gzs[j] != nullptr) bn_grad(s.ga, a, j, off, N);
    const int64_t KZ = a.K + a.Z;
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
      for (int64_t j = 0; j < a.npf; ++j) part[KZ + j] += dot(s.ga, pf_term(a.pf[j], s), N);
    }
    if (a.gx == nullptr) continue;
    // grad_x = sum_j w_j * (pf_j's vector-Jacobian product with grad), in pf order.
    for (int64_t j = 0; j < a.npf; ++j) {
      const acc_t wj = a.w[KZ + j];
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

// ---- mixed_op_bn -----------------------------------------------------------------------
// The same engine with Z BatchNorm inputs. The batch statistics and the running-stat update
// are aten's own CPU routine (batch_norm_update_stats, the one nn.BatchNorm2d's forward runs),
// so running statistics stay bit-equal to the module's; the normalized outputs are folded
// into the mix (forward) and recomputed from z (backward), never written. Backward is one
// reduction pass (per-channel sums of grad and grad * (z - mean), fixed chunks summed in chunk
// order) and the engine's elementwise pass, which also writes the BN input gradients.

namespace {

// The engine's arguments both directions share; w receives the candidates' weights in
// candidate order (gathered through w_index) and must outlive a.
template <typename T, typename acc_t>
void bn_args(Args<T, acc_t>& a, const BnInputs& in, const at::Tensor& stats, std::vector<const T*>& yp,
             std::vector<const T*>& zp, std::vector<acc_t>& w) {
  for (const auto& y : in.ys) yp.push_back(y.const_data_ptr<T>());
  for (const auto& z : in.zs) zp.push_back(z.const_data_ptr<T>());
  const acc_t* wall = in.w.const_data_ptr<acc_t>();
  for (int64_t i : in.widx) w.push_back(wall[i]);
  a.x = in.x.defined() ? in.x.const_data_ptr<T>() : nullptr;
  a.ys = yp.data();
  a.K = static_cast<int64_t>(yp.size());
  a.zs = zp.data();
  a.Z = static_cast<int64_t>(zp.size());
  a.stats = stats.const_data_ptr<acc_t>();
  a.ch = in.ch;
  a.pf = in.pf.data();
  a.npf = static_cast<int64_t>(in.pf.size());
  a.w = w.data();
  a.g = geo_of(in.geo);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mixed_op_bn_cpu(const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                                                   const at::Tensor& weights, at::IntArrayRef pf,
                                                   at::TensorList running_means, at::TensorList running_vars,
                                                   at::TensorList batches_tracked, c10::optional<double> momentum,
                                                   double eps, at::IntArrayRef w_index) {
  const BnForward fw =
      prepare_bn_forward(x, ys, zs, weights, pf, running_means, running_vars, batches_tracked, w_index);
  const int64_t Z = static_cast<int64_t>(fw.zs.size()), C = fw.ch.C;
  const auto acc = acc_type(fw.out.scalar_type());
  const at::Tensor& stats = fw.stats;
  const bool running = !running_means.empty();
  for (int64_t j = 0; j < Z; ++j) {
    // nn.BatchNorm2d.forward: count the batch, then the factor is momentum, or the
    // cumulative average 1 / num_batches_tracked when momentum is None.
    double factor = 0.0;
    if (!batches_tracked.empty()) {
      int64_t* n = batches_tracked[j].mutable_data_ptr<int64_t>();
      *n += 1;
      if (!momentum.has_value()) factor = 1.0 / static_cast<double>(*n);
    }
    if (momentum.has_value()) factor = *momentum;
    c10::optional<at::Tensor> rm, rv;
    if (running) rm = running_means[j], rv = running_vars[j];
    auto mv = at::batch_norm_update_stats(fw.zs[j], rm, rv, factor);
    at::Tensor mean = std::get<0>(mv).to(acc).contiguous(), var = std::get<1>(mv).to(acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "mixed_op_bn_stats_cpu", [&] {
      scalar_t* st = stats.mutable_data_ptr<scalar_t>() + j * 2 * C;
      const scalar_t* m = mean.const_data_ptr<scalar_t>();
      const scalar_t* v = var.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        st[c] = m[c];
        st[C + c] = scalar_t(1) / std::sqrt(v[c] + static_cast<scalar_t>(eps));
      }
    });
  }
  const Geo g = geo_of(fw.geo);
  const PfFlags f = flags_of(fw.pf);
  const int64_t per = images_per_chunk(g);
  const int64_t nchunks = (fw.geo.images + per - 1) / per;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fw.out.scalar_type(), "mixed_op_bn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> yp, zp;
    std::vector<acc_t> w;
    Args<scalar_t, acc_t> a{};
    bn_args(a, fw, stats, yp, zp, w);
    a.out = fw.out.mutable_data_ptr<scalar_t>();
    const auto count = window_counts<acc_t>(g, f.avg);
    a.count = count.data();
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      Scratch<acc_t> s(g.N);
      const int64_t ib = cb * per, ie = std::min(fw.geo.images, ce * per);
      cpu_has_avx2() ? forward_avx2(a, f, ib, ie, s) : forward_base(a, f, ib, ie, s);
    });
  });
  return {fw.out, stats};
}

namespace {

template <typename T, typename acc_t>
GAEA_TARGET_AVX2 void bn_reduce_avx2(const Args<T, acc_t>& a, int64_t ib, int64_t ie, acc_t* row, acc_t* ga) {
  for (int64_t img = ib; img < ie; ++img) {
    const int64_t off = img * a.g.N;
    for (int64_t i = 0; i < a.g.N; ++i) ga[i] = static_cast<acc_t>(a.grad[off + i]);
    bn_reduce(ga, a, off, a.g.N, row);
  }
}
template <typename T, typename acc_t>
void bn_reduce_base(const Args<T, acc_t>& a, int64_t ib, int64_t ie, acc_t* row, acc_t* ga) {
  for (int64_t img = ib; img < ie; ++img) {
    const int64_t off = img * a.g.N;
    for (int64_t i = 0; i < a.g.N; ++i) ga[i] = static_cast<acc_t>(a.grad[off + i]);
    bn_reduce(ga, a, off, a.g.N, row);
  }
}

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> mixed_op_bn_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, at::TensorList ys_in, at::TensorList zs_in,
    const at::Tensor& weights, at::IntArrayRef pf_in, const at::Tensor& stats_in, const c10::List<bool>& ys_mask,
    const c10::List<bool>& zs_mask, bool x_grad, bool weights_grad, at::IntArrayRef w_index) {
  const BnBackward bw = prepare_bn_backward(grad_in, x_in, ys_in, zs_in, weights, pf_in, stats_in, ys_mask, zs_mask,
                                            x_grad, w_index);
  const Geo g = geo_of(bw.geo);
  const int64_t K = static_cast<int64_t>(bw.ys.size()), Z = static_cast<int64_t>(bw.zs.size());
  const int64_t KP = K + Z + static_cast<int64_t>(bw.pf.size());
  const int64_t C = bw.ch.C;
  const int64_t per = images_per_chunk(g);
  const int64_t nchunks = g.N == 0 ? 0 : (bw.geo.images + per - 1) / per;
  const bool want_gx = bw.grad_x.numel() > 0;
  const PfFlags f = flags_of(bw.pf);
  // Host scratch as plain vectors (no tensor allocations besides the outputs).
  at::Tensor grad_all = at::zeros(bw.w.sizes(), bw.w.options());  // per weights entry
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bw.grad.scalar_type(), "mixed_op_bn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> yp, zp;
    std::vector<acc_t> w;
    Args<scalar_t, acc_t> a{};
    bn_args(a, bw, bw.stats, yp, zp, w);
    std::vector<scalar_t*> gyp, gzp;
    for (int64_t k = 0, n = 0; k < K; ++k)
      gyp.push_back(ys_mask.get(k) ? bw.grad_ys[n++].mutable_data_ptr<scalar_t>() : nullptr);
    for (int64_t j = 0, n = 0; j < Z; ++j)
      gzp.push_back(zs_mask.get(j) ? bw.grad_zs[n++].mutable_data_ptr<scalar_t>() : nullptr);
    a.grad = bw.grad.const_data_ptr<scalar_t>();
    a.gys = gyp.data();
    a.gzs = gzp.data();
    a.gx = want_gx ? bw.grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    a.dots = weights_grad;
    // Pass 1: per-channel sums, one row per chunk, then summed in chunk order.
    const int64_t RW = (1 + Z) * C;
    std::vector<acc_t> rows(nchunks * RW, acc_t(0));
    acc_t* rp = rows.data();
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<acc_t> ga(g.N);
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t ib = c * per, ie = std::min(bw.geo.images, ib + per);
        cpu_has_avx2() ? bn_reduce_avx2(a, ib, ie, rp + c * RW, ga.data())
                       : bn_reduce_base(a, ib, ie, rp + c * RW, ga.data());
      }
    });
    std::vector<acc_t> sums(RW, acc_t(0));
    for (int64_t c = 0; c < nchunks; ++c)
      for (int64_t r = 0; r < RW; ++r) sums[r] += rp[c * RW + r];
    std::vector<acc_t> coef(RW), grad_w(KP, acc_t(0));  // coef: gmean, then gcoef per z
    acc_t* cf = coef.data();
    acc_t* gw = grad_w.data();
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(bw.ch.M);
    for (int64_t c = 0; c < C; ++c) cf[c] = sums[c] * inv_m;
    for (int64_t j = 0; j < Z; ++j) {
      const acc_t* invstd = a.stats + j * 2 * C + C;
      acc_t dw = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = sums[(1 + j) * C + c] * invstd[c];  // sum(g * y_j) over the channel
        cf[(1 + j) * C + c] = d * inv_m;
        dw += d;
      }
      if (weights_grad) gw[K + j] = dw;
    }
    a.gmean = cf;
    a.gcoef = cf + C;
    // Pass 2: the engine's elementwise backward.
    const auto count = window_counts<acc_t>(g, f.avg);
    a.count = count.data();
    std::vector<acc_t> partials(weights_grad ? nchunks * KP : 0, acc_t(0));
    acc_t* parts = partials.data();
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      Scratch<acc_t> s(g.N);
      std::vector<acc_t> dummy(KP);
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t ib = c * per, ie = std::min(bw.geo.images, ib + per);
        acc_t* part = weights_grad ? parts + c * KP : dummy.data();
        cpu_has_avx2() ? backward_avx2(a, f, ib, ie, part, s) : backward_base(a, f, ib, ie, part, s);
      }
    });
    for (int64_t c = 0; c < (weights_grad ? nchunks : 0); ++c)
      for (int64_t k = 0; k < KP; ++k)
        if (k < K || k >= K + Z) gw[k] += parts[c * KP + k];
    acc_t* gall = grad_all.mutable_data_ptr<acc_t>();
    for (int64_t k = 0; k < KP; ++k) gall[bw.widx[k]] += gw[k];  // entries no candidate reads stay 0
  });
  return {bw.grad_ys, bw.grad_zs, bw.grad_x, grad_all.to(weights.scalar_type())};
}

TORCH_LIBRARY_IMPL(gaea, CPU, m) {
  m.impl("mixed_op_pf", &mixed_op_pf_cpu);
  m.impl("mixed_op_pf_backward", &mixed_op_pf_backward_cpu);
  m.impl("mixed_op_bn", &mixed_op_bn_cpu);
  m.impl("mixed_op_bn_backward", &mixed_op_bn_backward_cpu);
}

}  // namespace gaea
