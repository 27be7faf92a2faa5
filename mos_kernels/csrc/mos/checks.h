// Argument checks of the C++ operators: each error names the argument, what was expected and
// what came. The Python wrappers validate user input first; these guard the operator contract
// for direct callers of torch.ops.mos_cuda.*.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

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

}  // namespace mos
