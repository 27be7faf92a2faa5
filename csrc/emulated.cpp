// The CPU emulation of the CUDA backend: the same work items and operator bodies as the .cu
// files, run by a host loop and registered for CPU tensors. Built only on request
// (MOS_CUDA_EMULATE=1, the test suite) so that CI checks the kernel code without a GPU.
#include <torch/library.h>

#include "mos/launch_host.h"
#include "mos/session_pool_ops.h"
#include "mos/theme_dispatch_ops.h"
#include "mos/theme_gather_ops.h"

TORCH_LIBRARY_IMPL(mos_cuda, CPU, m) {
  m.impl("session_pool_route", &mos::session_pool_route<mos::HostExec>);
  m.impl("session_pool_route_backward", &mos::session_pool_route_backward<mos::HostExec>);
  m.impl("theme_dispatch", &mos::theme_dispatch<mos::HostExec>);
  m.impl("theme_gather", &mos::theme_gather<mos::HostExec>);
  m.impl("theme_scatter", &mos::theme_scatter<mos::HostExec>);
  m.impl("row_dot", &mos::row_dot<mos::HostExec>);
}
