// Operator mos_cuda::theme_dispatch for either executor; same contract as the Triton custom op
// mos::theme_dispatch (mos_kernels/theme_dispatch.py).
#pragma once

#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <tuple>

#include "checks.h"
#include "theme_dispatch.h"

namespace mos {

// Runs f(Bits{}) with Bits an unsigned integer as wide as the gate's float dtype: the fill
// copies the gate's bits, so one kernel serves every float type (float64 included).
template <class F>
void by_gate_width(const char* op, const at::Tensor& gate, F&& f) {
  switch (gate.element_size()) {
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: TORCH_CHECK(false, op, ": gate: expected a 2, 4 or 8 byte float, got ", gate.scalar_type());
  }
}

// Devices, dtypes, ranks and sizes (no data read): each error names its argument.
inline void check_dispatch_inputs(const char* op, const at::Tensor& themes, const at::Tensor& gate,
                                  const at::Tensor& session_offsets, const at::Tensor& session_example,
                                  const at::Tensor& example_session_offsets, int64_t num_tokens, int64_t num_themes,
                                  int64_t max_theme_tokens) {
  check_index(op, "themes", themes, themes, 2);
  check_device(op, "gate", gate, themes);
  check_dim(op, "gate", gate, 2);
  TORCH_CHECK(at::isFloatingType(gate.scalar_type()), op, ": gate: expected a floating dtype, got ",
              gate.scalar_type());
  check_index(op, "session_offsets", session_offsets, themes, 1);
  check_index(op, "session_example", session_example, themes, 1);
  check_index(op, "example_session_offsets", example_session_offsets, themes, 1);
  const int64_t num_sessions = themes.size(0), top_k = themes.size(1);
  check_numel(op, "gate", gate, num_sessions * top_k);
  check_numel(op, "session_offsets", session_offsets, num_sessions + 1);
  check_numel(op, "session_example", session_example, num_sessions);
  TORCH_CHECK(example_session_offsets.numel() >= 1, op,
              ": example_session_offsets: expected B+1 >= 1 entries, got 0");
  TORCH_CHECK(num_themes >= 1, op, ": num_themes: expected >= 1, got ", num_themes);
  TORCH_CHECK(num_tokens >= 0, op, ": num_tokens: expected >= 0, got ", num_tokens);
  TORCH_CHECK(num_tokens * top_k < (int64_t{1} << 31), op, ": num_tokens: expected num_tokens * top_k < 2^31 ",
              "(rows are counted in 32 bits), got ", num_tokens, " * ", top_k);
  TORCH_CHECK(max_theme_tokens >= 0, op, ": max_theme_tokens: expected >= 0 (0: unlimited), got ", max_theme_tokens);
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> theme_dispatch(
    const at::Tensor& themes_in, const at::Tensor& gate_in, const at::Tensor& session_offsets_in,
    const at::Tensor& session_example_in, const at::Tensor& example_session_offsets_in, int64_t num_tokens,
    int64_t num_themes, int64_t max_theme_tokens) {
  constexpr const char* op = "mos_cuda::theme_dispatch";
  check_dispatch_inputs(op, themes_in, gate_in, session_offsets_in, session_example_in, example_session_offsets_in,
                        num_tokens, num_themes, max_theme_tokens);
  const int64_t num_sessions = themes_in.size(0), top_k = themes_in.size(1);
  typename Exec::Guard guard(themes_in.device());
  const at::Tensor themes = themes_in.contiguous(), gate = gate_in.contiguous();
  const at::Tensor session_offsets = session_offsets_in.contiguous();
  const at::Tensor session_example = session_example_in.contiguous();
  const at::Tensor example_session_offsets = example_session_offsets_in.contiguous();
  const int64_t num_examples = example_session_offsets.numel() - 1;
  const auto index = themes.options();
  const auto index32 = themes.options().dtype(at::kInt);

  // CountItems writes every entry of rank (each (session, choice) has one theme) and of counts.
  at::Tensor rank = new_output({num_sessions, top_k}, index32);
  at::Tensor counts = new_output({num_themes * num_examples}, index32);
  Exec::run(num_examples * num_themes,
            CountItems{themes.const_data_ptr<int64_t>(), session_offsets.const_data_ptr<int64_t>(),
                       example_session_offsets.const_data_ptr<int64_t>(), rank.mutable_data_ptr<int32_t>(),
                       counts.mutable_data_ptr<int32_t>(), num_examples, num_themes, top_k});
  const at::Tensor kept = max_theme_tokens > 0 ? counts.clamp_max(max_theme_tokens) : counts;
  at::Tensor theme_offsets = at::zeros({num_themes * num_examples + 1}, index);
  at::Tensor segment_ends = theme_offsets.narrow(0, 1, num_themes * num_examples);
  at::cumsum_out(segment_ends, kept, 0, at::kLong);
  // Without max_theme_tokens every (token, choice) is a row: the size is known without a sync.
  // With one, the kept row count is read back once (the documented sync).
  const int64_t num_rows = max_theme_tokens > 0 ? theme_offsets[-1].item<int64_t>() : num_tokens * top_k;

  at::Tensor base = new_output({num_sessions, top_k}, index32);
  at::Tensor first_kept = new_output({num_sessions, top_k}, index32);
  at::Tensor token_session = new_output({num_tokens}, index32);
  Exec::run(num_sessions, SessionItems{themes.const_data_ptr<int64_t>(), session_offsets.const_data_ptr<int64_t>(),
                                       session_example.const_data_ptr<int64_t>(), rank.const_data_ptr<int32_t>(),
                                       counts.const_data_ptr<int32_t>(), theme_offsets.const_data_ptr<int64_t>(),
                                       base.mutable_data_ptr<int32_t>(), first_kept.mutable_data_ptr<int32_t>(),
                                       token_session.mutable_data_ptr<int32_t>(), num_examples, top_k,
                                       max_theme_tokens});

  at::Tensor gather_index = new_output({num_rows}, index);
  at::Tensor row_gate = new_output({num_rows}, gate.options());
  at::Tensor inverse_index = new_output({num_tokens, top_k}, index);
  by_gate_width(op, gate, [&](auto bits) {
    using Bits = decltype(bits);
    // Every token row, even past the last session (FillItems writes -1 there: no stray write).
    Exec::run(num_tokens, FillItems<Bits>{token_session.const_data_ptr<int32_t>(), base.const_data_ptr<int32_t>(),
                                          first_kept.const_data_ptr<int32_t>(),
                                          static_cast<const Bits*>(gate.const_data_ptr()),
                                          session_offsets.const_data_ptr<int64_t>(),
                                          gather_index.mutable_data_ptr<int64_t>(),
                                          static_cast<Bits*>(row_gate.mutable_data_ptr()),
                                          inverse_index.mutable_data_ptr<int64_t>(), num_sessions, top_k});
  });
  return {gather_index, row_gate, inverse_index, theme_offsets};
}

}  // namespace mos
