// Operators mos_cuda::theme_gather / theme_scatter / row_dot for either executor; same contract
// as the Triton custom ops of mos_kernels/theme_gather.py.
#pragma once

#include <ATen/ops/empty.h>

#include <optional>

#include "checks.h"
#include "theme_gather.h"

namespace mos {

namespace detail {

// The gate as fp32 (nullptr data when absent): kernels multiply in fp32 whatever its dtype.
inline at::Tensor fp32_gate(const char* op, const std::optional<at::Tensor>& gate, const at::Tensor& like,
                            int64_t num_rows) {
  if (!gate.has_value()) return at::Tensor();
  check_device(op, "row_gate", *gate, like);
  check_dim(op, "row_gate", *gate, 1);
  const auto dtype = gate->scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": row_gate: expected dtype float32, float16 or bfloat16, got ", dtype);
  check_numel(op, "row_gate", *gate, num_rows);
  return gate->to(at::kFloat).contiguous();
}

inline const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

}  // namespace detail

template <class Exec>
at::Tensor theme_gather(const at::Tensor& values_in, const at::Tensor& gather_index_in,
                        const std::optional<at::Tensor>& row_gate, const at::Tensor& inverse_index) {
  constexpr const char* op = "mos_cuda::theme_gather";
  check_dim(op, "values", values_in, 2);
  check_index(op, "gather_index", gather_index_in, values_in, 1);
  check_index(op, "inverse_index", inverse_index, values_in, 2);
  typename Exec::Guard guard(values_in.device());
  const at::Tensor values = values_in.contiguous(), gather_index = gather_index_in.contiguous();
  const int64_t num_rows = gather_index.numel(), dim = values.size(1);
  const at::Tensor gate = detail::fp32_gate(op, row_gate, values, num_rows);
  at::Tensor rows = new_output({num_rows, dim}, values.options());
  by_dtype(op, "values", values, [&](auto tag) {
    using T = decltype(tag);
    const RowChunks<T> row(dim, aligned16(values.data_ptr()) && aligned16(rows.data_ptr()));
    Exec::run(num_rows * row.chunks,
              GatherItems<T>{values.const_data_ptr<T>(), gather_index.const_data_ptr<int64_t>(),
                             detail::data_or_null(gate), rows.mutable_data_ptr<T>(), row});
  });
  return rows;
}

template <class Exec>
at::Tensor theme_scatter(const at::Tensor& rows_in, const at::Tensor& gather_index,
                         const std::optional<at::Tensor>& row_gate, const at::Tensor& inverse_index_in) {
  constexpr const char* op = "mos_cuda::theme_scatter";
  check_dim(op, "rows", rows_in, 2);
  check_index(op, "gather_index", gather_index, rows_in, 1);
  check_numel(op, "gather_index", gather_index, rows_in.size(0));
  check_index(op, "inverse_index", inverse_index_in, rows_in, 2);
  typename Exec::Guard guard(rows_in.device());
  const at::Tensor rows = rows_in.contiguous(), inverse_index = inverse_index_in.contiguous();
  const int64_t num_tokens = inverse_index.size(0), slots = inverse_index.size(1), dim = rows.size(1);
  const at::Tensor gate = detail::fp32_gate(op, row_gate, rows, rows.size(0));
  at::Tensor out = new_output({num_tokens, dim}, rows.options());
  by_dtype(op, "rows", rows, [&](auto tag) {
    using T = decltype(tag);
    const RowChunks<T> row(dim, aligned16(rows.data_ptr()) && aligned16(out.data_ptr()));
    Exec::run(num_tokens * row.chunks,
              ScatterItems<T>{rows.const_data_ptr<T>(), inverse_index.const_data_ptr<int64_t>(),
                              detail::data_or_null(gate), out.mutable_data_ptr<T>(), row, slots});
  });
  return out;
}

template <class Exec>
at::Tensor row_dot(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& b_index_in,
                   at::ScalarType out_dtype) {
  constexpr const char* op = "mos_cuda::row_dot";
  check_dim(op, "a", a_in, 2);
  check_device(op, "b", b_in, a_in);
  check_dtype(op, "b", b_in, a_in.scalar_type());
  check_dim(op, "b", b_in, 2);
  TORCH_CHECK(b_in.size(1) == a_in.size(1), op, ": b: expected ", a_in.size(1), " columns like a, got ",
              b_in.size(1));
  check_index(op, "b_index", b_index_in, a_in, 1);
  check_numel(op, "b_index", b_index_in, a_in.size(0));
  typename Exec::Guard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), b_index = b_index_in.contiguous();
  at::Tensor out = new_output({a.size(0)}, a.options().dtype(at::kFloat));
  by_dtype(op, "a", a, [&](auto tag) {
    using T = decltype(tag);
    const RowChunks<T> row(a.size(1), aligned16(a.data_ptr()) && aligned16(b.data_ptr()));
    Exec::run(a.size(0), RowDotItems<T>{a.const_data_ptr<T>(), b.const_data_ptr<T>(),
                                        b_index.const_data_ptr<int64_t>(), out.mutable_data_ptr<float>(), row});
  });
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

}  // namespace mos
