// Session pooling (each session's mean) and routing (its top-k themes) as work items; see items.h.
//
//   PoolItems   (session, chunk) -> pooled mean, fp32 sum in time order
//   RouteItems  session -> scores, probs, top-k themes from the stored (rounded) mean,
//               K dot products in registers (ThemeValues)
// Routing runs as its own pass over the pooled rows (S x d, a small fraction of the T x d rows
// read by pooling), one thread per session. The backward is in session_pool_grad.h.
#pragma once

#include <cmath>

#include "items.h"

namespace mos {

// Floor of |h| in the normalisation h / max(|h|, eps): NORM_EPS of mos_kernels/routing.py
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
  MOS_HD MOS_INLINE float operator[](int64_t k) const { return v[k]; }
};

template <>
struct ThemeValues<0> {
  float* v;
  MOS_HD explicit ThemeValues(float* row) : v(row) {}
  MOS_HD MOS_INLINE float& operator[](int64_t k) { return v[k]; }
  MOS_HD MOS_INLINE float operator[](int64_t k) const { return v[k]; }
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

}  // namespace mos
