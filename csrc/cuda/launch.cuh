// Launch shapes and the deterministic weight-gradient finish shared by the mixed-op kernels:
// per-block partial sums, then one block per candidate adding them in block order.
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"
#include "reduce.cuh"

namespace gaea {

constexpr int kThreads = 256;

// K pointers passed by value in the launch arguments (no pointer array in device memory).
template <typename T>
struct Ptrs {
  T* p[kMaxK];
};

// One block per candidate sums that candidate's per-block partials in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const acc_t* partials, int nblocks, int nk, acc_t* grad_w) {
  __shared__ acc_t scratch[kThreads / kWarp];
  const int k = blockIdx.x;
  acc_t s = 0;
  for (int b = threadIdx.x; b < nblocks; b += blockDim.x) s += partials[static_cast<int64_t>(b) * nk + k];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) grad_w[k] = s;
}

inline int grid_for(int64_t work_items) {
  // Enough resident blocks to saturate memory; a grid that depends only on the size and the
  // device keeps the reduction order, and so the result, reproducible.
  const int max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 8;
  const int64_t need = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(need, max_blocks)));
}

}  // namespace gaea
