// Work items: the one execution model of every kernel in csrc/.
//
// Each kernel is a functor `Items` whose `operator()(int64_t item)` computes a disjoint set of
// outputs from read-only inputs: no shared memory, no synchronisation, no atomics, no item
// reading what another item writes. Two executors run it:
//   * launch_cuda.cuh: a grid-stride CUDA kernel, one thread per item (the real backend);
//   * launch_host.h: a loop on the CPU (the emulation, MOS_CUDA_EMULATE=1), which lets CI run
//     the very same item code against the reference without a GPU.
// Independence is what makes the emulation faithful: any order of items gives the same bits.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define MOS_HD __host__ __device__
#define MOS_INLINE __forceinline__
#define MOS_UNROLL _Pragma("unroll")
#else
#define MOS_HD
#define MOS_INLINE inline
#define MOS_UNROLL
#endif

namespace mos {

// Rows are moved in chunks of 16 bytes (one vector load per thread on the GPU).
template <class T>
struct Chunk {
  static constexpr int kElems = 16 / sizeof(T);
};

template <class T>
struct alignas(16) Pack {
  T v[Chunk<T>::kElems];
};

// Loads `n` (<= kElems) elements starting at p into fp32. `packed` means p is 16-byte aligned
// and the chunk is full, so one vector load suffices.
template <class T>
MOS_HD MOS_INLINE void load_chunk(const T* p, int n, bool packed, float* out) {
  constexpr int V = Chunk<T>::kElems;
  if (packed) {
    Pack<T> pack = *reinterpret_cast<const Pack<T>*>(p);
    MOS_UNROLL
    for (int i = 0; i < V; ++i) out[i] = static_cast<float>(pack.v[i]);
  } else {
    MOS_UNROLL
    for (int i = 0; i < V; ++i) out[i] = i < n ? static_cast<float>(p[i]) : 0.0f;
  }
}

// Stores the first `n` values rounded to T (round to nearest even, as torch's casts).
template <class T>
MOS_HD MOS_INLINE void store_chunk(T* p, int n, bool packed, const float* in) {
  constexpr int V = Chunk<T>::kElems;
  if (packed) {
    Pack<T> pack;
    MOS_UNROLL
    for (int i = 0; i < V; ++i) pack.v[i] = static_cast<T>(in[i]);
    *reinterpret_cast<Pack<T>*>(p) = pack;
  } else {
    MOS_UNROLL   // to the compile-time V with a guard: `in` stays in registers
    for (int i = 0; i < V; ++i) if (i < n) p[i] = static_cast<T>(in[i]);
  }
}

// Copies a chunk bit for bit (no rounding through fp32).
template <class T>
MOS_HD MOS_INLINE void copy_chunk(T* dst, const T* src, int n, bool packed) {
  if (packed) {
    *reinterpret_cast<Pack<T>*>(dst) = *reinterpret_cast<const Pack<T>*>(src);
  } else {
    MOS_UNROLL
    for (int i = 0; i < Chunk<T>::kElems; ++i) if (i < n) dst[i] = src[i];
  }
}

// How a row of `dim` elements splits into chunks, and whether every chunk can use vector access.
template <class T>
struct RowChunks {
  int64_t dim = 0;
  int64_t chunks = 0;
  bool packed = false;

  RowChunks() = default;
  RowChunks(int64_t dim_, bool aligned) : dim(dim_) {
    constexpr int V = Chunk<T>::kElems;
    chunks = (dim + V - 1) / V;
    packed = aligned && dim % V == 0;
  }
  MOS_HD MOS_INLINE int width(int64_t chunk) const {
    const int64_t left = dim - chunk * Chunk<T>::kElems;
    return left < Chunk<T>::kElems ? static_cast<int>(left) : Chunk<T>::kElems;
  }
};

// Per-theme values of a work item (scores, counters) live in registers when the number of
// themes has a compile-time bound. Runs f(std::integral_constant<int, MAX_K>) with the smallest
// bound that holds num_themes (8 or 32), or 0 (any K, values in memory) above that.
template <class F>
void by_theme_bound(int64_t num_themes, F&& f) {
  if (num_themes <= 8) {
    f(std::integral_constant<int, 8>{});
  } else if (num_themes <= 32) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

}  // namespace mos
