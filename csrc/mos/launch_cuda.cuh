// The CUDA executor of work items: one thread per item in a grid-stride loop (see items.h).
// Every launch is checked; kernels run on the current stream of the tensors' device.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace mos {

constexpr int kThreads = 256;
// A grid-stride loop covers any n; past ~1M blocks more blocks only add scheduling.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

template <class Items>
__global__ void __launch_bounds__(kThreads) run_items(int64_t n, Items items) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) items(i);
}

struct CudaExec {
  using Guard = c10::cuda::CUDAGuard;

  template <class Items>
  static void run(int64_t n, const Items& items) {
    if (n <= 0) return;
    const int64_t blocks = std::min((n + kThreads - 1) / kThreads, kMaxBlocks);
    run_items<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace mos
