// CUDA kernels of mos_cuda::theme_dispatch; see mos/theme_dispatch.h.
#include <torch/library.h>

#include "mos/launch_cuda.cuh"
#include "mos/theme_dispatch_ops.h"

TORCH_LIBRARY_IMPL(mos_cuda, CUDA, m) {
  m.impl("theme_dispatch", &mos::theme_dispatch<mos::CudaExec>);
}
