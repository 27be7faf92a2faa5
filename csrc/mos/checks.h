// Argument checks and output allocation of the C++ operators.
//
// The checks cover what costs no sync: devices, dtypes, ranks, sizes; each error names the
// argument, what was expected and what came. The data itself is a precondition, validated by
// the Python wrappers (mos_kernels._checks, switchable with data_checks): offsets
// non-decreasing from 0 to T, indices and themes in range, a session's themes distinct. A
// kernel given data that breaks them may read or write out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <limits>

namespace mos {

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, ": expected a tensor on ", like.device(), ", got ",
              t.device());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t ndim) {
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, ": expected ", ndim, " dimensions, got shape ", t.sizes());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_index(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                        int64_t ndim) {
  check_device(op, name, t, like);
  check_dim(op, name, t, ndim);
  check_dtype(op, name, t, at::kLong);
}

inline void check_numel(const char* op, const char* name, const at::Tensor& t, int64_t numel) {
  TORCH_CHECK(t.numel() == numel, op, ": ", name, ": expected ", numel, " elements, got ", t.numel());
}

// Runs f(T{}) with T the C++ type of a kernel dtype: fp32, fp16 or bf16.
template <class F>
void by_dtype(const char* op, const char* name, const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default:
      TORCH_CHECK(false, op, ": ", name, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// An output a kernel must write completely. Under MOS_POISON_OUTPUTS=1 (the tests'
// mos_kernels._alloc.poisoned_outputs sets it) it starts as NaN / INT_POISON, so an element the
// kernel forgets fails the comparison instead of passing with whatever the allocator held.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  const char* poison = std::getenv("MOS_POISON_OUTPUTS");
  if (poison != nullptr && poison[0] == '1' && out.numel() > 0) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(-7777777);   // = mos_kernels._alloc.INT_POISON
    }
  }
  return out;
}

}  // namespace mos
