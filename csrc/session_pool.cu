// CUDA kernels of mos_cuda::session_pool_route(_backward); see mos/session_pool.h.
#include <torch/library.h>

#include "mos/launch_cuda.cuh"
#include "mos/session_pool_ops.h"

TORCH_LIBRARY_IMPL(mos_cuda, CUDA, m) {
  m.impl("session_pool_route", &mos::session_pool_route<mos::CudaExec>);
  m.impl("session_pool_route_backward", &mos::session_pool_route_backward<mos::CudaExec>);
}
