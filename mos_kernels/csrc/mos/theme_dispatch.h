// Theme dispatch (spec step 4) as a stable counting sort in work items; see items.h.
//
//   CountItems  example b -> walks its sessions in time order: the rank of every
//               (session, choice) inside its (theme, example) segment, and the segment sizes
//               (counters in registers for K <= 32)
//   (host)      exclusive prefix sum of the sizes (capped by the capacity) -> segment starts
//   FillItems   token row t -> its destination row for every choice, the gather index,
//               the row's (session, choice) and the inverse index
// Integer only, no atomics: the layout is deterministic and identical to the reference's
// stable sort. Segment k*B + b holds example b's rows of theme k.
#pragma once

#include "items.h"

namespace mos {

// The running size of each of the example's K segments. With MAX_K > 0 (K <= MAX_K) the
// counters live in registers (unrolled compare-and-select, no memory round trip per session);
// MAX_K = 0 (any K) keeps them in the output `counts` itself.
template <int MAX_K>
struct SegmentCounters {
  int64_t v[MAX_K];
  MOS_HD SegmentCounters(int64_t*, int64_t, int64_t) {
    MOS_UNROLL
    for (int k = 0; k < MAX_K; ++k) v[k] = 0;
  }
  // The rank of the first of `length` rows joining segment `theme`, whose size grows by `length`.
  MOS_HD MOS_INLINE int64_t take(int64_t theme, int64_t length) {
    int64_t rank = 0;
    MOS_UNROLL
    for (int k = 0; k < MAX_K; ++k) {
      if (k == theme) {
        rank = v[k];
        v[k] += length;
      }
    }
    return rank;
  }
  MOS_HD void store(int64_t* counts, int64_t num_themes, int64_t num_examples, int64_t b) const {
    MOS_UNROLL
    for (int k = 0; k < MAX_K; ++k) if (k < num_themes) counts[k * num_examples + b] = v[k];
  }
};

template <>
struct SegmentCounters<0> {
  int64_t* counts;   // zeroed by the host; only this example's entries (k*B + b) are touched
  int64_t num_examples, b;
  MOS_HD SegmentCounters(int64_t* counts_, int64_t num_examples_, int64_t b_)
      : counts(counts_), num_examples(num_examples_), b(b_) {}
  MOS_HD MOS_INLINE int64_t take(int64_t theme, int64_t length) {
    int64_t* count = counts + theme * num_examples + b;
    const int64_t rank = *count;
    *count += length;
    return rank;
  }
  MOS_HD void store(int64_t*, int64_t, int64_t, int64_t) const {}
};

template <int MAX_K>
struct CountItems {
  const int64_t* themes;                   // [S, top_k]
  const int64_t* session_offsets;          // [S+1] token rows
  const int64_t* example_session_offsets;  // [B+1] sessions of each example
  int64_t* rank;                           // [S, top_k] out: first rank of the session's rows
  int64_t* counts;                         // [K*B] out (zeroed): rows of segment k*B + b
  int64_t num_examples, num_themes, top_k;

  MOS_HD void operator()(int64_t b) const {
    SegmentCounters<MAX_K> segments(counts, num_examples, b);
    for (int64_t s = example_session_offsets[b]; s < example_session_offsets[b + 1]; ++s) {
      const int64_t length = session_offsets[s + 1] - session_offsets[s];
      for (int64_t j = 0; j < top_k; ++j) rank[s * top_k + j] = segments.take(themes[s * top_k + j], length);
    }
    segments.store(counts, num_themes, num_examples, b);
  }
};

struct FillItems {
  const int64_t* themes;            // [S, top_k]
  const int64_t* session_offsets;   // [S+1]
  const int64_t* session_example;   // [S]
  const int64_t* rank;              // [S, top_k]
  const int64_t* counts;            // [K*B] uncapped segment sizes
  const int64_t* theme_offsets;     // [K*B+1] segment starts after the capacity
  int64_t* gather_index;            // [T'] out: source token of every row
  int64_t* row_source;              // [T'] out: session * top_k + choice of every row
  int64_t* inverse_index;           // [T, top_k] out: row of each (token, choice), -1 if dropped
  int64_t num_sessions, num_examples, top_k, capacity;   // capacity 0: keep every row

  MOS_HD void operator()(int64_t t) const {
    if (t >= session_offsets[num_sessions]) {   // num_tokens beyond the sessions: no row, no stray write
      for (int64_t j = 0; j < top_k; ++j) inverse_index[t * top_k + j] = -1;
      return;
    }
    const int64_t s = segment_of(session_offsets, num_sessions, t);
    const int64_t offset_in_session = t - session_offsets[s];
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t key = themes[s * top_k + j] * num_examples + session_example[s];
      int64_t row_rank = rank[s * top_k + j] + offset_in_session;
      // Capacity keeps the newest rows: the oldest (count - capacity) ranks are dropped.
      if (capacity > 0 && counts[key] > capacity) row_rank -= counts[key] - capacity;
      if (row_rank < 0) {
        inverse_index[t * top_k + j] = -1;
        continue;
      }
      const int64_t dest = theme_offsets[key] + row_rank;
      gather_index[dest] = t;
      row_source[dest] = s * top_k + j;
      inverse_index[t * top_k + j] = dest;
    }
  }
};

}  // namespace mos
