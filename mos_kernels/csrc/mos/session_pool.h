// Session pooling and routing (spec steps 2-3) as work items; see items.h.
//
// Forward:  PoolItems    (session, chunk) -> pooled mean, fp32 sum in time order
//           RouteItems   session -> scores, probs, top-k themes from the stored (rounded) mean,
//                        K dot products in registers (ThemeValues)
// Backward: RouteGradItems session -> grad of the scores through the softmax, and the total
//                          grad of the pooled row (its own + through the normalisation)
//           SpreadItems  (session, chunk) -> every row of the session gets grad / count
// Routing runs as its own pass over the pooled rows (S x d, a small fraction of the T x d rows
// read by pooling), one thread per session.
#pragma once

#include <cmath>

#include "items.h"

namespace mos {

// Floor of |h| in the normalisation h / max(|h|, eps): NORM_EPS of mos_kernels/theme_route.py
// (a test keeps the two equal).
constexpr float kNormEps = 1e-6f;

template <class T>
struct PoolItems {
  const T* values;           // [T, d]
  const int64_t* offsets;    // [S+1]
  T* pooled;                 // [S, d]
  RowChunks<T> row;

  MOS_HD void operator()(int64_t item) const {
    constexpr int V = Chunk<T>::kElems;
    const int64_t s = item / row.chunks, chunk = item % row.chunks;
    const int64_t col = chunk * V, start = offsets[s], end = offsets[s + 1];
    const int n = row.width(chunk);
    float acc[V] = {};
    for (int64_t r = start; r < end; ++r) {
      float x[V];
      load_chunk(values + r * row.dim + col, n, row.packed, x);
MOS_UNROLL
      for (int i = 0; i < V; ++i) acc[i] += x[i];
    }
    // Divide (not multiply by a reciprocal): the reference's rounding. Empty sessions pool to 0.
    const float count = end - start > 0 ? static_cast<float>(end - start) : 1.0f;
MOS_UNROLL
    for (int i = 0; i < V; ++i) acc[i] = acc[i] / count;
    store_chunk(pooled + s * row.dim + col, n, row.packed, acc);
  }
};

// The per-theme fp32 values of one session. With MAX_K > 0 (and K <= MAX_K) they live in
// registers: loops run to the compile-time bound, fully unrolled, with a k < K guard, so the
// pooled row is read once whatever K. MAX_K = 0 (any K) keeps them in the session's row of an
// output buffer instead.
template <int MAX_K>
struct ThemeValues {
  float v[MAX_K];
  MOS_HD explicit ThemeValues(float*) {}
  MOS_HD MOS_INLINE float& operator[](int64_t k) { return v[k]; }
};

template <>
struct ThemeValues<0> {
  float* v;
  MOS_HD explicit ThemeValues(float* row) : v(row) {}
  MOS_HD MOS_INLINE float& operator[](int64_t k) { return v[k]; }
};

template <class T, int MAX_K>
struct RouteItems {
  const T* pooled;           // [S, d]
  const float* prototypes;   // [K, d], unit rows
  float* scores;             // [S, K]
  float* probs;              // [S, K]
  int64_t* themes;           // [S, top_k]
  RowChunks<T> row;
  int64_t num_themes, top_k;
  float inv_temperature, eps;

  // |h| of the session's pooled row, in fp32.
  MOS_HD MOS_INLINE float norm_of(const T* h) const {
    constexpr int V = Chunk<T>::kElems;
    float sq = 0.0f;
    for (int64_t chunk = 0; chunk < row.chunks; ++chunk) {
      float x[V];
      load_chunk(h + chunk * V, row.width(chunk), row.packed, x);   // zero past the row's end
      MOS_UNROLL
      for (int i = 0; i < V; ++i) sq += x[i] * x[i];
    }
    return sqrtf(sq);
  }

  MOS_HD void operator()(int64_t s) const {
    constexpr int V = Chunk<T>::kElems;
    const int64_t dim = row.dim, bound = MAX_K > 0 ? MAX_K : num_themes;
    const T* h = pooled + s * dim;
    const float norm = norm_of(h);
    const float denom = norm > eps ? norm : eps;
    float* score = scores + s * num_themes;
    ThemeValues<MAX_K> dot(score);
    MOS_UNROLL
    for (int64_t k = 0; k < bound; ++k) if (k < num_themes) dot[k] = 0.0f;
    // Scores as the reference rounds them: <h / max(|h|, eps), prototype> * (1 / temperature).
    for (int64_t chunk = 0; chunk < row.chunks; ++chunk) {
      const int n = row.width(chunk);
      float x[V];
      load_chunk(h + chunk * V, n, row.packed, x);
      MOS_UNROLL
      for (int i = 0; i < V; ++i) {
        if (i < n) {
          const float unit = x[i] / denom;
          const float* proto = prototypes + chunk * V + i;
          MOS_UNROLL
          for (int64_t k = 0; k < bound; ++k) if (k < num_themes) dot[k] += unit * proto[k * dim];
        }
      }
    }
    float best = -INFINITY;
    MOS_UNROLL
    for (int64_t k = 0; k < bound; ++k) {
      if (k < num_themes) {
        score[k] = dot[k] * inv_temperature;
        best = score[k] > best ? score[k] : best;
      }
    }
    float total = 0.0f;
    float* prob = probs + s * num_themes;
    for (int64_t k = 0; k < num_themes; ++k) {
      prob[k] = expf(score[k] - best);
      total += prob[k];
    }
    for (int64_t k = 0; k < num_themes; ++k) prob[k] = prob[k] / total;
    // Top-k by repeated argmax; ties go to the lower theme index, as in the reference.
    int64_t* chosen = themes + s * top_k;
    for (int64_t j = 0; j < top_k; ++j) {
      int64_t arg = -1;
      for (int64_t k = 0; k < num_themes; ++k) {
        bool taken = false;
        for (int64_t i = 0; i < j; ++i) taken = taken || chosen[i] == k;
        if (!taken && (arg < 0 || score[k] > score[arg])) arg = k;
      }
      chosen[j] = arg;
    }
  }
};

template <class T, int MAX_K>
struct RouteGradItems {
  const T* g_pooled;         // [S, d]
  const float* g_scores;     // [S, K] incoming grad of the scores
  const float* g_probs;      // [S, K] incoming grad of the probabilities
  const float* probs;        // [S, K]
  const float* prototypes;   // [K, d] unit rows
  const T* pooled;           // [S, d]
  float* g_scores_total;     // [S, K] out: grad of the scores incl. the softmax
  float* g_hidden;           // [S, d] out: total grad of the pooled row, fp32
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
    // d(loss)/d(unit[c]) = inv_temperature * sum_k g_s[k] * prototypes[k, c]
    auto g_unit = [&](int64_t c) {
      float acc = 0.0f;
      MOS_UNROLL
      for (int64_t k = 0; k < bound; ++k) if (k < num_themes) acc += g_s[k] * prototypes[k * dim + c];
      return acc * inv_temperature;
    };
    // Pass 1: |h| and <h, g_unit>. Pass 2: backward of h / max(|h|, eps): project out the radial
    // part, unless clamped by eps; plus the pooled row's own grad.
    float sq = 0.0f, h_dot_g = 0.0f;
    for (int64_t chunk = 0; chunk < row.chunks; ++chunk) {
      const int n = row.width(chunk);
      float x[V];
      load_chunk(pooled + s * dim + chunk * V, n, row.packed, x);
      MOS_UNROLL
      for (int i = 0; i < V; ++i) {
        if (i < n) {
          sq += x[i] * x[i];
          h_dot_g += x[i] * g_unit(chunk * V + i);
        }
      }
    }
    const float norm = sqrtf(sq);
    const float denom = norm > eps ? norm : eps;
    const float radial = h_dot_g / denom;
    for (int64_t chunk = 0; chunk < row.chunks; ++chunk) {
      const int n = row.width(chunk);
      float x[V], g[V];
      load_chunk(pooled + s * dim + chunk * V, n, row.packed, x);
      load_chunk(g_pooled + s * dim + chunk * V, n, row.packed, g);
      MOS_UNROLL
      for (int i = 0; i < V; ++i) {
        if (i < n) {
          const float gu = g_unit(chunk * V + i);
          const float unit = x[i] / denom;
          const float through = norm > eps ? (gu - unit * radial) / denom : gu / eps;
          g_hidden[s * dim + chunk * V + i] = g[i] + through;
        }
      }
    }
  }
};

// G: the type of the per-session grad (fp32 g_hidden after routing, T when pooling alone).
template <class T, class G>
struct SpreadItems {
  const G* g_session;        // [S, d]
  const int64_t* offsets;    // [S+1]
  T* g_values;               // [T, d]
  RowChunks<T> row;

  MOS_HD void operator()(int64_t item) const {
    constexpr int V = Chunk<T>::kElems;
    const int64_t s = item / row.chunks, chunk = item % row.chunks;
    const int64_t col = chunk * V, start = offsets[s], end = offsets[s + 1];
    const int n = row.width(chunk);
    if (end == start) return;   // no rows; never turns a huge grad into inf * 0
    float g[V];
    for (int i = 0; i < V; ++i) g[i] = i < n ? static_cast<float>(g_session[s * row.dim + col + i]) : 0.0f;
    const float count = static_cast<float>(end - start);
    // Rounded to T once, then copied to every row: each row receives exactly the same value.
    Pack<T> rounded;   // aligned, so the packed path may store it as one vector
MOS_UNROLL
    for (int i = 0; i < V; ++i) rounded.v[i] = static_cast<T>(g[i] / count);
    for (int64_t r = start; r < end; ++r) copy_chunk(g_values + r * row.dim + col, rounded.v, n, row.packed);
  }
};

}  // namespace mos
