// The backward of session pooling and routing as work items; see items.h, session_pool.h.
//
//   RouteGradItems   session -> grad of the scores through the softmax (an output), and the
//                    two scalars the normalisation's backward needs: max(|h|, eps) and the
//                    radial part <h, g_unit> / max(|h|, eps)
//   RouteSpreadItems (session, chunk) -> the pooled row's total grad on that chunk (its own +
//                    through the normalisation, from the scalars and the prototypes), divided
//                    by the count and copied to every row of the session
//   SpreadItems      (session, chunk) -> the same without routing (pooling alone)
// The pooled row's total grad is never stored: each chunk recomputes its columns of
// g_unit = inv_temperature * g_scores @ prototypes (K multiply-adds per column).
#pragma once

#include <cmath>

#include "items.h"
#include "session_pool.h"

namespace mos {

// A session's per-theme grads read for the backward: in registers for K <= MAX_K, else read
// in place (MAX_K = 0).
template <int MAX_K>
struct ThemeRow {
  float v[MAX_K];
  MOS_HD ThemeRow(const float* row, int64_t num_themes) {
    MOS_UNROLL
    for (int64_t k = 0; k < MAX_K; ++k) v[k] = k < num_themes ? row[k] : 0.0f;
  }
  MOS_HD MOS_INLINE float operator[](int64_t k) const { return v[k]; }
};

template <>
struct ThemeRow<0> {
  const float* v;
  MOS_HD ThemeRow(const float* row, int64_t) : v(row) {}
  MOS_HD MOS_INLINE float operator[](int64_t k) const { return v[k]; }
};

// d(loss)/d(unit[c]) = inv_temperature * sum_k g_s[k] * prototypes[k, c]
template <int MAX_K, class Values>
MOS_HD MOS_INLINE float grad_of_unit(const Values& g_s, const float* prototypes, int64_t dim, int64_t num_themes,
                                     int64_t c, float inv_temperature) {
  const int64_t bound = MAX_K > 0 ? MAX_K : num_themes;
  float acc = 0.0f;
  MOS_UNROLL
  for (int64_t k = 0; k < bound; ++k) if (k < num_themes) acc += g_s[k] * prototypes[k * dim + c];
  return acc * inv_temperature;
}

template <class T, int MAX_K>
struct RouteGradItems {
  const float* g_scores;     // [S, K] incoming grad of the scores
  const float* g_probs;      // [S, K] incoming grad of the probabilities
  const float* probs;        // [S, K]
  const float* prototypes;   // [K, d] unit rows
  const T* pooled;           // [S, d]
  float* g_scores_total;     // [S, K] out: grad of the scores incl. the softmax
  float* norm_terms;         // [S, 2] out: max(|h|, eps), <h, g_unit> / max(|h|, eps)
  RowChunks<T> row;
  int64_t num_themes;
  float inv_temperature, eps;

  MOS_HD void operator()(int64_t s) const {
    constexpr int V = Chunk<T>::kElems;
    const int64_t dim = row.dim, bound = MAX_K > 0 ? MAX_K : num_themes;
    const float* p = probs + s * num_themes;
    const float* gp = g_probs + s * num_themes;
    float* g_s_out = g_scores_total + s * num_themes;
    ThemeValues<MAX_K> g_s(g_s_out);
    float p_dot = 0.0f;
    for (int64_t k = 0; k < num_themes; ++k) p_dot += p[k] * gp[k];
    MOS_UNROLL
    for (int64_t k = 0; k < bound; ++k) {
      if (k < num_themes) {
        g_s[k] = g_scores[s * num_themes + k] + p[k] * (gp[k] - p_dot);   // softmax backward
        g_s_out[k] = g_s[k];
      }
    }
    float sq = 0.0f, h_dot_g = 0.0f;
    for (int64_t chunk = 0; chunk < row.chunks; ++chunk) {
      const int n = row.width(chunk);
      float x[V];
      load_chunk(pooled + s * dim + chunk * V, n, row.packed, x);
      MOS_UNROLL
      for (int i = 0; i < V; ++i) {
        if (i < n) {
          sq += x[i] * x[i];
          h_dot_g += x[i] * grad_of_unit<MAX_K>(g_s, prototypes, dim, num_themes, chunk * V + i, inv_temperature);
        }
      }
    }
    const float norm = sqrtf(sq);
    const float denom = norm > eps ? norm : eps;
    norm_terms[2 * s] = denom;
    norm_terms[2 * s + 1] = h_dot_g / denom;
  }
};

// Divides a session's grad chunk by its row count, rounds it to T once and copies it to every
// row: each row receives exactly the same value. Empty sessions have no rows (and a zero mean
// may carry a huge grad through the eps branch: never multiplied by 0 into a NaN here).
template <class T>
MOS_HD MOS_INLINE void spread_chunk(const float* g, T* g_values, const int64_t* offsets, int64_t s, int64_t chunk,
                                    const RowChunks<T>& row) {
  constexpr int V = Chunk<T>::kElems;
  const int64_t start = offsets[s], end = offsets[s + 1];
  if (end == start) return;
  const float count = static_cast<float>(end - start);
  Pack<T> rounded;   // aligned, so the packed path may store it as one vector
  MOS_UNROLL
  for (int i = 0; i < V; ++i) rounded.v[i] = static_cast<T>(g[i] / count);
  const int n = row.width(chunk);
  for (int64_t r = start; r < end; ++r) copy_chunk(g_values + r * row.dim + chunk * V, rounded.v, n, row.packed);
}

template <class T, int MAX_K>
struct RouteSpreadItems {
  const T* g_pooled;         // [S, d]
  const T* pooled;           // [S, d]
  const float* g_scores_total;   // [S, K] from RouteGradItems
  const float* norm_terms;   // [S, 2] from RouteGradItems
  const float* prototypes;   // [K, d]
  const int64_t* offsets;    // [S+1]
  T* g_values;               // [T, d]
  RowChunks<T> row;          // of g_values; pooled and g_pooled share its packing
  int64_t num_themes;
  float inv_temperature, eps;

  MOS_HD void operator()(int64_t item) const {
    constexpr int V = Chunk<T>::kElems;
    const int64_t s = item / row.chunks, chunk = item % row.chunks, dim = row.dim;
    if (offsets[s + 1] == offsets[s]) return;
    const int n = row.width(chunk);
    float x[V], g[V];
    load_chunk(pooled + s * dim + chunk * V, n, row.packed, x);
    load_chunk(g_pooled + s * dim + chunk * V, n, row.packed, g);
    // Up to 8 theme grads ride in registers; more would cost occupancy in this bandwidth-bound
    // kernel (156 registers a thread at 32), so they are read in place (L1 hits) instead.
    const ThemeRow<(MAX_K <= 8 ? MAX_K : 0)> g_s(g_scores_total + s * num_themes, num_themes);
    const float denom = norm_terms[2 * s], radial = norm_terms[2 * s + 1];
    MOS_UNROLL
    for (int i = 0; i < V; ++i) {
      if (i < n) {
        // Backward of h / max(|h|, eps): project out the radial part, unless clamped by eps.
        const float gu = grad_of_unit<MAX_K>(g_s, prototypes, dim, num_themes, chunk * V + i, inv_temperature);
        g[i] += denom > eps ? (gu - x[i] / denom * radial) / denom : gu / eps;
      }
    }
    spread_chunk(g, g_values, offsets, s, chunk, row);
  }
};

template <class T>
struct SpreadItems {
  const T* g_pooled;         // [S, d]
  const int64_t* offsets;    // [S+1]
  T* g_values;               // [T, d]
  RowChunks<T> row;          // of g_values; g_pooled shares its packing

  MOS_HD void operator()(int64_t item) const {
    constexpr int V = Chunk<T>::kElems;
    const int64_t s = item / row.chunks, chunk = item % row.chunks;
    float g[V];
    load_chunk(g_pooled + s * row.dim + chunk * V, row.width(chunk), row.packed, g);
    spread_chunk(g, g_values, offsets, s, chunk, row);
  }
};

}  // namespace mos
