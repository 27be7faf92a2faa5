// Theme gather / scatter and the gate gradient as work items; see items.h.
//
//   GatherItems  (row, chunk):   rows[r] = values[gather_index[r]] * gate[r]
//   ScatterItems (token, chunk): out[t] = sum over the token's rows (inverse index, fixed
//                                order) of rows[r] * gate[r]; a gather-sum, no atomics
//   RowDotItems  row:            out[r] = <a[r], b[b_index[r]]>, the grad of a row gate
// Gates are fp32 here (the host converts them): one multiply in fp32, one rounding to T.
#pragma once

#include "items.h"

namespace mos {

template <class T>
struct GatherItems {
  const T* values;              // [T, d]
  const int64_t* gather_index;  // [T']
  const float* gate;            // [T'] or nullptr
  T* rows;                      // [T', d]
  RowChunks<T> row;

  MOS_HD void operator()(int64_t item) const {
    constexpr int V = Chunk<T>::kElems;
    const int64_t r = item / row.chunks, chunk = item % row.chunks;
    const int64_t col = chunk * V;
    const int n = row.width(chunk);
    const T* src = values + gather_index[r] * row.dim + col;
    T* dst = rows + r * row.dim + col;
    if (gate == nullptr) {
      copy_chunk(dst, src, n, row.packed);   // data movement: bit for bit
      return;
    }
    float x[V];
    load_chunk(src, n, row.packed, x);
    const float g = gate[r];
    MOS_UNROLL
    for (int i = 0; i < V; ++i) x[i] *= g;
    store_chunk(dst, n, row.packed, x);
  }
};

template <class T>
struct ScatterItems {
  const T* rows;                 // [T', d]
  const int64_t* inverse_index;  // [T, slots], -1 for none
  const float* gate;             // [T'] or nullptr
  T* out;                        // [T, d]
  RowChunks<T> row;
  int64_t slots;

  MOS_HD void operator()(int64_t item) const {
    constexpr int V = Chunk<T>::kElems;
    const int64_t t = item / row.chunks, chunk = item % row.chunks;
    const int64_t col = chunk * V;
    const int n = row.width(chunk);
    float acc[V] = {};
    // Slots in a fixed order: the sum does not depend on scheduling.
    for (int64_t j = 0; j < slots; ++j) {
      const int64_t r = inverse_index[t * slots + j];
      if (r < 0) continue;
      float x[V];
      load_chunk(rows + r * row.dim + col, n, row.packed, x);
      const float g = gate == nullptr ? 1.0f : gate[r];
      MOS_UNROLL
      for (int i = 0; i < V; ++i) acc[i] += x[i] * g;
    }
    store_chunk(out + t * row.dim + col, n, row.packed, acc);
  }
};

template <class T>
struct RowDotItems {
  const T* a;               // [R, d]
  const T* b;               // [N, d]
  const int64_t* b_index;   // [R]
  float* out;               // [R]
  RowChunks<T> row;

  MOS_HD void operator()(int64_t r) const {
    constexpr int V = Chunk<T>::kElems;
    const T* a_row = a + r * row.dim;
    const T* b_row = b + b_index[r] * row.dim;
    float acc = 0.0f;
    for (int64_t chunk = 0; chunk < row.chunks; ++chunk) {
      const int n = row.width(chunk);
      float x[V], y[V];
      load_chunk(a_row + chunk * V, n, row.packed, x);
      load_chunk(b_row + chunk * V, n, row.packed, y);
      MOS_UNROLL
      for (int i = 0; i < V; ++i) acc += x[i] * y[i];
    }
    out[r] = acc;
  }
};

}  // namespace mos
