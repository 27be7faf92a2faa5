// Operators mos_cuda::session_pool_route(_backward), for either executor (Exec: CudaExec in
// session_pool.cu, HostExec in emulated.cpp). Same contract as the Triton custom ops of
// mos_kernels/session_pool.py.
#pragma once

#include <ATen/ops/empty.h>

#include <tuple>

#include "checks.h"
#include "session_pool.h"
#include "session_pool_grad.h"

namespace mos {

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> session_pool_route(
    const at::Tensor& values_in, const at::Tensor& session_offsets, const at::Tensor& prototypes_in,
    double inv_temperature, int64_t top_k) {
  constexpr const char* op = "mos_cuda::session_pool_route";
  check_dim(op, "values", values_in, 2);
  check_index(op, "session_offsets", session_offsets, values_in, 1);
  check_device(op, "prototypes", prototypes_in, values_in);
  check_dim(op, "prototypes", prototypes_in, 2);
  check_dtype(op, "prototypes", prototypes_in, at::kFloat);
  TORCH_CHECK(prototypes_in.size(1) == values_in.size(1), op, ": prototypes: expected ", values_in.size(1),
              " columns like values, got ", prototypes_in.size(1));
  TORCH_CHECK(top_k >= 0 && top_k <= prototypes_in.size(0), op, ": top_k: expected 0..", prototypes_in.size(0),
              " (the number of prototypes), got ", top_k);
  typename Exec::Guard guard(values_in.device());
  const at::Tensor values = values_in.contiguous(), prototypes = prototypes_in.contiguous();
  const at::Tensor offsets = session_offsets.contiguous();
  TORCH_CHECK(offsets.numel() >= 1, op, ": session_offsets: expected S+1 >= 1 entries, got 0");
  const int64_t num_sessions = offsets.numel() - 1, dim = values.size(1), num_themes = prototypes.size(0);
  const auto f32 = values.options().dtype(at::kFloat);
  at::Tensor pooled = new_output({num_sessions, dim}, values.options());
  at::Tensor scores = new_output({num_sessions, num_themes}, f32);
  at::Tensor probs = new_output({num_sessions, num_themes}, f32);
  at::Tensor themes = new_output({num_sessions, top_k}, values.options().dtype(at::kLong));
  by_dtype(op, "values", values, [&](auto tag) {
    using T = decltype(tag);
    const RowChunks<T> row(dim, aligned16(values.data_ptr()) && aligned16(pooled.data_ptr()));
    Exec::run(num_sessions * row.chunks,
              PoolItems<T>{values.const_data_ptr<T>(), offsets.const_data_ptr<int64_t>(),
                           pooled.mutable_data_ptr<T>(), row});
    if (num_themes == 0) return;
    by_theme_bound(num_themes, [&](auto bound) {
      Exec::run(num_sessions,
                RouteItems<T, decltype(bound)::value>{
                    pooled.const_data_ptr<T>(), prototypes.const_data_ptr<float>(), scores.mutable_data_ptr<float>(),
                    probs.mutable_data_ptr<float>(), themes.mutable_data_ptr<int64_t>(), row, num_themes, top_k,
                    static_cast<float>(inv_temperature), kNormEps});
    });
  });
  return {pooled, scores, probs, themes};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> session_pool_route_backward(
    const at::Tensor& g_pooled_in, const at::Tensor& g_scores_in, const at::Tensor& g_probs_in,
    const at::Tensor& values, const at::Tensor& pooled_in, const at::Tensor& probs_in,
    const at::Tensor& prototypes_in, const at::Tensor& session_offsets, double inv_temperature) {
  constexpr const char* op = "mos_cuda::session_pool_route_backward";
  check_dim(op, "values", values, 2);
  check_index(op, "session_offsets", session_offsets, values, 1);
  TORCH_CHECK(session_offsets.numel() >= 1, op, ": session_offsets: expected S+1 >= 1 entries, got 0");
  const int64_t num_sessions = session_offsets.numel() - 1, dim = values.size(1);
  for (auto [name, t] : {std::pair{"g_pooled", &g_pooled_in}, std::pair{"pooled", &pooled_in}}) {
    check_device(op, name, *t, values);
    check_dtype(op, name, *t, values.scalar_type());
    TORCH_CHECK(t->dim() == 2 && t->size(0) == num_sessions && t->size(1) == dim, op, ": ", name,
                ": expected shape [", num_sessions, ", ", dim, "], got ", t->sizes());
  }
  check_device(op, "prototypes", prototypes_in, values);
  check_dtype(op, "prototypes", prototypes_in, at::kFloat);
  check_dim(op, "prototypes", prototypes_in, 2);
  const int64_t num_themes = prototypes_in.size(0);
  for (auto [name, t] : {std::pair{"g_scores", &g_scores_in}, std::pair{"g_probs", &g_probs_in},
                         std::pair{"probs", &probs_in}}) {
    check_device(op, name, *t, values);
    check_dtype(op, name, *t, at::kFloat);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == num_sessions && t->size(1) == num_themes, op, ": ", name,
                ": expected shape [", num_sessions, ", ", num_themes, "], got ", t->sizes());
  }
  typename Exec::Guard guard(values.device());
  const at::Tensor g_pooled = g_pooled_in.contiguous(), pooled = pooled_in.contiguous();
  const at::Tensor offsets = session_offsets.contiguous(), prototypes = prototypes_in.contiguous();
  at::Tensor g_values = new_output(values.sizes(), values.options());
  at::Tensor g_scores_total = new_output({num_sessions, num_themes}, values.options().dtype(at::kFloat));
  by_dtype(op, "values", values, [&](auto tag) {
    using T = decltype(tag);
    // One packing for the three [*, d] operands the spread reads or writes chunk by chunk.
    const RowChunks<T> row(dim, aligned16(g_values.data_ptr()) && aligned16(g_pooled.data_ptr()) &&
                                    aligned16(pooled.data_ptr()));
    if (num_themes == 0) {
      Exec::run(num_sessions * row.chunks,
                SpreadItems<T>{g_pooled.const_data_ptr<T>(), offsets.const_data_ptr<int64_t>(),
                               g_values.mutable_data_ptr<T>(), row});
      return;
    }
    const at::Tensor g_scores = g_scores_in.contiguous(), g_probs = g_probs_in.contiguous();
    const at::Tensor probs = probs_in.contiguous();
    at::Tensor norm_terms = new_output({num_sessions, 2}, values.options().dtype(at::kFloat));
    const float inv_t = static_cast<float>(inv_temperature);
    by_theme_bound(num_themes, [&](auto bound) {
      constexpr int MAX_K = decltype(bound)::value;
      Exec::run(num_sessions,
                RouteGradItems<T, MAX_K>{g_scores.const_data_ptr<float>(), g_probs.const_data_ptr<float>(),
                                         probs.const_data_ptr<float>(), prototypes.const_data_ptr<float>(),
                                         pooled.const_data_ptr<T>(), g_scores_total.mutable_data_ptr<float>(),
                                         norm_terms.mutable_data_ptr<float>(), row, num_themes, inv_t, kNormEps});
      Exec::run(num_sessions * row.chunks,
                RouteSpreadItems<T, MAX_K>{g_pooled.const_data_ptr<T>(), pooled.const_data_ptr<T>(),
                                           g_scores_total.const_data_ptr<float>(), norm_terms.const_data_ptr<float>(),
                                           prototypes.const_data_ptr<float>(), offsets.const_data_ptr<int64_t>(),
                                           g_values.mutable_data_ptr<T>(), row, num_themes, inv_t, kNormEps});
    });
  });
  return {g_values, g_scores_total};
}

}  // namespace mos
