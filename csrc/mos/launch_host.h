// The CPU executor of work items (the emulation of the CUDA backend; see items.h).
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/Device.h>

#include <cstdint>

namespace mos {

struct HostExec {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  // Items are independent, so a parallel loop over them gives the same bits as a serial one.
  template <class Items>
  static void run(int64_t n, const Items& items) {
    if (n <= 0) return;
    at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) items(i);
    });
  }
};

}  // namespace mos
