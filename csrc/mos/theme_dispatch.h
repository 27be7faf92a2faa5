// Theme dispatch as a stable counting sort in work items; see items.h.
//
//   CountItems    (example b, theme k) -> walks b's sessions in time order: the rank of every
//                 (session, choice) of theme k inside segment (k, b), and the segment's size
//   (host)        exclusive prefix sum of the sizes (capped at max_theme_tokens) -> segment starts
//   SessionItems  session s -> the base of each of its choices (token row t goes to base + t),
//                 the first row max_theme_tokens keeps, and the session of each of its token rows
//   FillItems     token row t -> its destination row for every choice, the gather index,
//                 the row's gate (copied bit for bit) and the inverse index
// Integer only, no atomics: the layout is deterministic and identical to the reference's
// stable sort. Segment k*B + b holds example b's rows of theme k. Rows are counted in 32 bits
// (the operator checks T * top_k < 2^31); the outputs are int64.
//
// Why (example, theme) items for the count: the rank is a running sum over an example's
// sessions, a serial chain that independent items cannot split without synchronisation; one
// item per (example, theme) keeps the chain but gives K times the threads of one item per
// example, and the K items of an example read the same sessions (one broadcast load per warp).
#pragma once

#include "items.h"

namespace mos {

struct CountItems {
  const int64_t* themes;                   // [S, top_k]
  const int64_t* session_offsets;          // [S+1] token rows
  const int64_t* example_session_offsets;  // [B+1] sessions of each example
  int32_t* rank;                           // [S, top_k] out: first rank of the session's rows
  int32_t* counts;                         // [K*B] out: rows of segment k*B + b
  int64_t num_examples, num_themes, top_k;

  MOS_HD void operator()(int64_t item) const {
    const int64_t b = item / num_themes, k = item % num_themes;
    int32_t size = 0;
    for (int64_t s = example_session_offsets[b]; s < example_session_offsets[b + 1]; ++s) {
      // A session's themes are distinct: at most one choice is theme k.
      for (int64_t j = 0; j < top_k; ++j) {
        if (themes[s * top_k + j] == k) {
          rank[s * top_k + j] = size;
          size += static_cast<int32_t>(session_offsets[s + 1] - session_offsets[s]);
        }
      }
    }
    counts[k * num_examples + b] = size;
  }
};

struct SessionItems {
  const int64_t* themes;            // [S, top_k]
  const int64_t* session_offsets;   // [S+1]
  const int64_t* session_example;   // [S]
  const int32_t* rank;              // [S, top_k]
  const int32_t* counts;            // [K*B] uncapped segment sizes
  const int64_t* theme_offsets;     // [K*B+1] segment starts after the max_theme_tokens cap
  int32_t* base;                    // [S, top_k] out: destination of token row t = base + t
  int32_t* first_kept;              // [S, top_k] out: the first token row max_theme_tokens keeps
  int32_t* token_session;           // [T] out: the session of every token row
  int64_t num_examples, top_k, max_theme_tokens;   // max_theme_tokens 0: keep every row

  MOS_HD void operator()(int64_t s) const {
    const int64_t start = session_offsets[s], end = session_offsets[s + 1];
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t key = themes[s * top_k + j] * num_examples + session_example[s];
      // The token row of rank 0 in the segment (rank <= start: ranks count earlier rows of the
      // example); max_theme_tokens keeps the newest rows, dropping the oldest count - max_theme_tokens ranks.
      int32_t kept_from = static_cast<int32_t>(start) - rank[s * top_k + j];
      if (max_theme_tokens > 0 && counts[key] > max_theme_tokens)
        kept_from += counts[key] - static_cast<int32_t>(max_theme_tokens);
      first_kept[s * top_k + j] = kept_from;
      base[s * top_k + j] = static_cast<int32_t>(theme_offsets[key]) - kept_from;
    }
    for (int64_t t = start; t < end; ++t) token_session[t] = static_cast<int32_t>(s);
  }
};

// Bits: an unsigned integer as wide as the gate's dtype.
template <class Bits>
struct FillItems {
  const int32_t* token_session;     // [T] (rows past the last session are not read)
  const int32_t* base;              // [S, top_k]
  const int32_t* first_kept;        // [S, top_k]
  const Bits* gate;                 // [S, top_k]
  const int64_t* session_offsets;   // [S+1]
  int64_t* gather_index;            // [T'] out: source token of every row
  Bits* row_gate;                   // [T'] out: gate of every row
  int64_t* inverse_index;           // [T, top_k] out: row of each (token, choice), -1 if dropped
  int64_t num_sessions, top_k;

  MOS_HD void operator()(int64_t t) const {
    const bool in_sessions = t < session_offsets[num_sessions];   // num_tokens beyond: no row, no stray write
    const int64_t s = in_sessions ? token_session[t] : 0;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t pair = s * top_k + j;
      if (!in_sessions || t < first_kept[pair]) {
        inverse_index[t * top_k + j] = -1;
        continue;
      }
      const int64_t dest = base[pair] + t;
      gather_index[dest] = t;
      row_gate[dest] = gate[pair];
      inverse_index[t * top_k + j] = dest;
    }
  }
};

}  // namespace mos
