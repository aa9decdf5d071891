// Input validation and memory-layout planning shared by the CPU and CUDA twins, so both
// backends reject the same inputs with the same messages and agree with the Python fakes.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace gaea {

// Kernels receive the K input pointers by value in their launch arguments.
constexpr int64_t kMaxK = 64;

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// float32 arithmetic for half types, float64 for float64 (what at::opmath_type gives).
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Everything a backend needs before launching: checked inputs made dense in one layout
// (the one all ys already share, e.g. channels_last, else contiguous; copies only where
// needed), the weights as a contiguous acc-type vector, and outputs in that layout.
struct MixedForward {
  std::vector<at::Tensor> ys;
  at::Tensor w, out;
};
MixedForward prepare_forward(at::TensorList ys, const at::Tensor& weights);

struct MixedBackward {
  std::vector<at::Tensor> ys;
  at::Tensor w, grad;
  std::vector<at::Tensor> grad_ys;  // one per true entry of ys_mask, in order
};
MixedBackward prepare_backward(const at::Tensor& grad, at::TensorList ys, const at::Tensor& weights,
                               const c10::List<bool>& ys_mask);

// ---- mixed_op_pf: parameter-free candidates computed from the edge input x -------------

// Codes of the parameter-free candidates (the schema's int[] pf). `none` has no code: its
// output is zero, so callers leave it out.
enum PfCode : int64_t { kPfSkip = 1, kPfAvgPool = 2, kPfMaxPool = 3 };
constexpr int64_t kMaxPf = 3;

// x seen as `images` dense blocks of H x W pixels, each pixel P interleaved values: for
// NCHW (or CHW) one image per (b, c) plane and P = 1; for channels_last one image per b and
// P = C. A 3x3 neighbour of element i is i + dy * W * P + dx * P in both cases.
struct PfGeometry {
  int64_t images = 0, H = 0, W = 0, P = 1;
};

struct PfForward {
  at::Tensor x;
  std::vector<at::Tensor> ys;
  at::Tensor w, out;
  std::vector<int64_t> pf;
  PfGeometry geo;
};
PfForward prepare_pf_forward(const at::Tensor& x, at::TensorList ys, const at::Tensor& weights,
                             at::IntArrayRef pf);

struct PfBackward {
  at::Tensor x;
  std::vector<at::Tensor> ys;
  at::Tensor w, grad;
  std::vector<int64_t> pf;
  PfGeometry geo;
  std::vector<at::Tensor> grad_ys;  // one per true entry of ys_mask, in order
  at::Tensor grad_x;                // undefined unless x_grad and pf is not empty
};
PfBackward prepare_pf_backward(const at::Tensor& grad, const at::Tensor& x, at::TensorList ys,
                               const at::Tensor& weights, at::IntArrayRef pf,
                               const c10::List<bool>& ys_mask, bool x_grad);

// ---- mixed_op_bn: candidates ending in BatchNorm(affine=False), normalized inside ------

// Where a BN channel lives in the dense layout: element i belongs to channel
// cl ? i % C : (i / S) % C, S the spatial size (product of dims 2..).
struct BnChannels {
  int64_t C = 0, S = 1, M = 0;  // M = elements per channel (batch * S)
  bool cl = false;
};

// The inputs both directions share, checked and made dense in one layout (the one x, if pf
// reads it, the ys and the zs already share, else contiguous).
struct BnInputs {
  at::Tensor x;                      // undefined unless pf is not empty
  std::vector<at::Tensor> ys, zs;
  at::Tensor w;                      // all of weights, acc type, contiguous
  std::vector<int64_t> widx;         // weights entry of each candidate (ys, zs, pf)
  std::vector<int64_t> pf;
  PfGeometry geo;                    // of the output (x's when pf is not empty)
  BnChannels ch;
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
};

struct BnForward : BnInputs {
  at::Tensor out, stats;             // stats: [Z, 2, C] acc type (mean, invstd), to be filled
};
BnForward prepare_bn_forward(const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                             const at::Tensor& weights, at::IntArrayRef pf, at::TensorList running_means,
                             at::TensorList running_vars, at::TensorList batches_tracked,
                             at::IntArrayRef w_index);

struct BnBackward : BnInputs {
  at::Tensor grad, stats;            // stats: [Z, 2, C] acc type, contiguous
  std::vector<at::Tensor> grad_ys, grad_zs;  // one per true mask entry, in order
  at::Tensor grad_x;                         // empty unless x_grad and pf is not empty
};
BnBackward prepare_bn_backward(const at::Tensor& grad, const at::Tensor& x, at::TensorList ys, at::TensorList zs,
                               const at::Tensor& weights, at::IntArrayRef pf, const at::Tensor& stats,
                               const c10::List<bool>& ys_mask, const c10::List<bool>& zs_mask, bool x_grad,
                               at::IntArrayRef w_index);

void check_eg_update(at::TensorList params, at::TensorList grads,
                     const c10::optional<at::Tensor>& lr_tensor, double eps);

}  // namespace gaea
