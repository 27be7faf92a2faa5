// CUDA kernels of mos_cuda::theme_gather / theme_scatter / row_dot; see mos/theme_gather.h.
#include <torch/library.h>

#include "mos/launch_cuda.cuh"
#include "mos/theme_gather_ops.h"

TORCH_LIBRARY_IMPL(mos_cuda, CUDA, m) {
  m.impl("theme_gather", &mos::theme_gather<mos::CudaExec>);
  m.impl("theme_scatter", &mos::theme_scatter<mos::CudaExec>);
  m.impl("row_dot", &mos::row_dot<mos::CudaExec>);
}
