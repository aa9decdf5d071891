// Multi-tensor row engine (after apex's multi_tensor_apply): it owns splitting a tensor list
// into launches and mapping each warp to one row (last dimension) of one tensor; a small
// per-row functor does the math. NAS architecture tensors are tiny and many, so one launch
// for the whole list, not one per tensor, is where the time goes.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <vector>

#include "reduce.cuh"

namespace gaea {

// 48 tensors keep the launch arguments near 1.6 KB, well inside the 4 KB limit.
constexpr int kMaxTensorsPerLaunch = 48;
constexpr int kRowThreads = 256;

template <typename scalar_t>
struct RowListMeta {
  scalar_t* p[kMaxTensorsPerLaunch];
  const scalar_t* g[kMaxTensorsPerLaunch];
  int64_t row_end[kMaxTensorsPerLaunch];  // cumulative row count up to and including tensor i
  int64_t len[kMaxTensorsPerLaunch];
  int count;
};

template <typename scalar_t, typename Op>
__global__ void __launch_bounds__(kRowThreads) row_kernel(RowListMeta<scalar_t> meta, Op op) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t total = meta.row_end[meta.count - 1];
  int t = 0;
  for (int64_t r = warp; r < total; r += nwarps) {  // warp-uniform: rows are never split
    while (r >= meta.row_end[t]) ++t;
    const int64_t first = t > 0 ? meta.row_end[t - 1] : 0;
    const int64_t off = (r - first) * meta.len[t];
    op(meta.p[t] + off, meta.g[t] + off, meta.len[t], lane);
  }
}

// Runs op on every row of every (p, g) pair; ps and gs must be contiguous and non-empty.
template <typename scalar_t, typename Op>
void apply_rows(const std::vector<at::Tensor>& ps, const std::vector<at::Tensor>& gs, const Op& op) {
  const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;
  auto stream = at::cuda::getCurrentCUDAStream();
  RowListMeta<scalar_t> meta{};
  int64_t rows = 0;
  auto launch = [&] {
    const int64_t need = (rows * kWarp + kRowThreads - 1) / kRowThreads;
    const int blocks = static_cast<int>(std::min<int64_t>(need, max_blocks));
    row_kernel<scalar_t, Op><<<blocks, kRowThreads, 0, stream>>>(meta, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    meta.count = 0;
    rows = 0;
  };
  for (size_t i = 0; i < ps.size(); ++i) {
    const int64_t len = ps[i].size(-1);
    rows += ps[i].numel() / len;
    meta.p[meta.count] = ps[i].mutable_data_ptr<scalar_t>();
    meta.g[meta.count] = gs[i].const_data_ptr<scalar_t>();
    meta.len[meta.count] = len;
    meta.row_end[meta.count] = rows;
    if (++meta.count == kMaxTensorsPerLaunch) launch();
  }
  if (meta.count > 0) launch();
}

}  // namespace gaea
