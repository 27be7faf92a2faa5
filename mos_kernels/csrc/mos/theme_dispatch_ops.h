// Operator mos_cuda::theme_dispatch for either executor; same contract as the Triton custom op
// mos::theme_dispatch (mos_kernels/theme_dispatch.py).
#pragma once

#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "checks.h"
#include "theme_dispatch.h"

namespace mos {

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> theme_dispatch(
    const at::Tensor& themes_in, const at::Tensor& session_offsets_in, const at::Tensor& session_example_in,
    const at::Tensor& example_session_offsets_in, int64_t num_tokens, int64_t num_themes, int64_t capacity) {
  constexpr const char* op = "mos_cuda::theme_dispatch";
  check_index(op, "themes", themes_in, themes_in, 2);
  check_index(op, "session_offsets", session_offsets_in, themes_in, 1);
  check_index(op, "session_example", session_example_in, themes_in, 1);
  check_index(op, "example_session_offsets", example_session_offsets_in, themes_in, 1);
  const int64_t num_sessions = themes_in.size(0), top_k = themes_in.size(1);
  check_numel(op, "session_offsets", session_offsets_in, num_sessions + 1);
  check_numel(op, "session_example", session_example_in, num_sessions);
  TORCH_CHECK(example_session_offsets_in.numel() >= 1, op,
              ": example_session_offsets: expected B+1 >= 1 entries, got 0");
  TORCH_CHECK(num_themes >= 1, op, ": num_themes: expected >= 1, got ", num_themes);
  TORCH_CHECK(num_tokens >= 0, op, ": num_tokens: expected >= 0, got ", num_tokens);
  TORCH_CHECK(capacity >= 0, op, ": capacity: expected >= 0 (0: unlimited), got ", capacity);
  typename Exec::Guard guard(themes_in.device());
  const at::Tensor themes = themes_in.contiguous(), session_offsets = session_offsets_in.contiguous();
  const at::Tensor session_example = session_example_in.contiguous();
  const at::Tensor example_session_offsets = example_session_offsets_in.contiguous();
  const int64_t num_examples = example_session_offsets.numel() - 1;
  const auto index = themes.options();

  at::Tensor rank = new_output({num_sessions, top_k}, index);
  at::Tensor counts = at::zeros({num_themes * num_examples}, index);
  by_theme_bound(num_themes, [&](auto bound) {
    Exec::run(num_examples, CountItems<decltype(bound)::value>{
                                themes.const_data_ptr<int64_t>(), session_offsets.const_data_ptr<int64_t>(),
                                example_session_offsets.const_data_ptr<int64_t>(), rank.mutable_data_ptr<int64_t>(),
                                counts.mutable_data_ptr<int64_t>(), num_examples, num_themes, top_k});
  });
  const at::Tensor kept = capacity > 0 ? counts.clamp_max(capacity) : counts;
  at::Tensor theme_offsets = at::zeros({num_themes * num_examples + 1}, index);
  theme_offsets.narrow(0, 1, num_themes * num_examples).copy_(at::cumsum(kept, 0));
  // Without a capacity every (token, choice) is a row: the size is known without a sync.
  // With one, the kept row count is read back once (the documented sync).
  const int64_t num_rows = capacity > 0 ? theme_offsets[-1].item<int64_t>() : num_tokens * top_k;

  at::Tensor gather_index = new_output({num_rows}, index);
  at::Tensor row_source = new_output({num_rows}, index);
  at::Tensor inverse_index = new_output({num_tokens, top_k}, index);
  // Every token row, even past the last session (FillItems writes -1 there: no stray write).
  Exec::run(num_tokens, FillItems{themes.const_data_ptr<int64_t>(), session_offsets.const_data_ptr<int64_t>(),
                                  session_example.const_data_ptr<int64_t>(), rank.const_data_ptr<int64_t>(),
                                  counts.const_data_ptr<int64_t>(), theme_offsets.const_data_ptr<int64_t>(),
                                  gather_index.mutable_data_ptr<int64_t>(), row_source.mutable_data_ptr<int64_t>(),
                                  inverse_index.mutable_data_ptr<int64_t>(), num_sessions, num_examples, top_k,
                                  capacity});
  return {gather_index, row_source, inverse_index, theme_offsets};
}

}  // namespace mos
