// Shared by the CUDA kernels: storage <-> math conversions, 16-byte packs, launch configuration.
// Header-only over the CUDA runtime and csrc/step_math.h (no ATen), so every .cu compiles alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "../step_args.h"
#include "../step_math.h"

namespace fastdiff {
namespace cuda {

template <typename S>
using math_t = typename std::conditional<std::is_same<S, double>::value, double, float>::type;

__device__ inline float to_math(float v) { return v; }
__device__ inline double to_math(double v) { return v; }
__device__ inline float to_math(__half v) { return __half2float(v); }
__device__ inline float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename S> __device__ inline S from_math(math_t<S> v);
template <> __device__ inline float from_math<float>(float v) { return v; }
template <> __device__ inline double from_math<double>(double v) { return v; }
template <> __device__ inline __half from_math<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 from_math<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements moved as one 16-byte (or narrower) load/store.
template <typename S, int VEC>
struct alignas(sizeof(S) * VEC) Pack {
  S v[VEC];
};

template <int VEC, typename S>
__device__ inline Pack<S, VEC> load_pack(const S* p) {
  return *reinterpret_cast<const Pack<S, VEC>*>(p);
}

template <int VEC, typename S>
__device__ inline void store_pack(S* p, const Pack<S, VEC>& v) {
  *reinterpret_cast<Pack<S, VEC>*>(p) = v;
}

// Elements per 16-byte pack of S.
template <typename S>
constexpr int pack_of() {
  return int(16 / sizeof(S));
}

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// --- Philox quads (Triton's randn4x layout, csrc/philox.h) ---------------------------------------
// The kernels that draw the stream give each thread one quad: 4 consecutive elements of a sample,
// whose 4 normals one fd_randn4 call makes. A sample of numel elements has ceil(numel / 4) quads;
// the last one holds numel % 4 elements when that is not 0.
struct QuadItem {
  int64_t b, q, i, idx;  // sample, quad, first element in the sample, flat index b * numel + i
  int count;             // elements of the quad inside the sample: 4, or fewer at its tail
};

__host__ __device__ inline int64_t quads_of(int64_t numel) {
  return (numel + 3) / 4;
}

__device__ inline QuadItem quad_item(int64_t item, int64_t quads, int64_t numel) {
  QuadItem w;
  w.b = item / quads;
  w.q = item - w.b * quads;
  w.i = 4 * w.q;
  w.idx = w.b * numel + w.i;
  const int64_t left = numel - w.i;
  w.count = left < 4 ? int(left) : 4;
  return w;
}

// Pack<S, 4> loads of whole quads need numel % 4 == 0 (no quad crosses a sample) and pointers
// aligned to 4 * sizeof(S) (16 bytes for float); else a quad is moved element by element.
template <typename S>
inline bool quad_aligned(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(S))) == 0;
}

// --- items of the step and q_sample kernels -------------------------------------------------------
// A thread's unit of work: E = item_elems<S>() consecutive elements of one sample, 16 bytes of
// 16-bit storage (8 elements, two Philox quads) or one quad of 32/64-bit storage (16 / 32 bytes),
// moved as one vector when PACK (every item whole and every pointer E-element aligned).
template <typename S>
__host__ __device__ constexpr int item_elems() {
  return sizeof(S) == 2 ? 8 : 4;
}

struct Item {
  int64_t b, i, idx;  // sample, first element in the sample, flat index b * numel + i
  int count;          // elements of the item inside the sample: E, or fewer at its tail
};

__device__ inline Item item_of(int64_t t, int64_t items_per_sample, int64_t numel, int elems) {
  Item w;
  w.b = t / items_per_sample;
  w.i = (t - w.b * items_per_sample) * elems;
  w.idx = w.b * numel + w.i;
  const int64_t left = numel - w.i;
  w.count = left < elems ? int(left) : elems;
  return w;
}

// p (an element pointer of S) can move E-element vectors.
template <typename S>
inline bool item_aligned(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % (item_elems<S>() * sizeof(S))) == 0;
}

template <bool PACK, int E, typename S>
__device__ inline Pack<S, E> load_item(const S* p, int count) {
  Pack<S, E> r;
  if (PACK) {
    r = load_pack<E>(p);
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) r.v[e] = e < count ? p[e] : from_math<S>(math_t<S>(0));
  }
  return r;
}

template <bool PACK, int E, typename S>
__device__ inline void store_item(S* p, int count, const Pack<S, E>& v) {
  if (PACK) {
    store_pack<E>(p, v);
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e)
      if (e < count) p[e] = v.v[e];
  }
}

// The `count` elements of a quad at p as math values (0 past count). PACK: one 4-element load.
template <bool PACK, typename S>
__device__ inline void load_quad(const S* p, int count, math_t<S> v[4]) {
  if (PACK) {
    const auto pk = load_pack<4>(p);
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = to_math(pk.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = e < count ? math_t<S>(to_math(p[e])) : math_t<S>(0);
  }
}

template <bool PACK, typename S>
__device__ inline void store_quad(S* p, int count, const math_t<S> v[4]) {
  if (PACK) {
    Pack<S, 4> pk;
#pragma unroll
    for (int e = 0; e < 4; ++e) pk.v[e] = from_math<S>(v[e]);
    store_pack<4>(p, pk);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (e < count) p[e] = from_math<S>(v[e]);
  }
}

constexpr int kThreads = 256;

// Grid for a grid-stride loop over `work` items: enough blocks to fill the GPU, no more (the SM
// count is looked up once per device, not per launch).
inline unsigned blocks_for(int64_t work) {
  static int sm_count[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  int sms = device >= 0 && device < 64 ? sm_count[device] : 0;
  if (sms == 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 80;
    if (device >= 0 && device < 64) sm_count[device] = sms;
  }
  int64_t wanted = (work + kThreads - 1) / kThreads, cap = int64_t(sms) * 8;
  return unsigned(wanted < 1 ? 1 : (wanted < cap ? wanted : cap));
}

// Storage dtype code -> type, for the launchers.
template <typename F>
void dispatch_dtype(int dtype, const F& f) {
  switch (dtype) {
    case FD_F32: f(float{}); break;
    case FD_F64: f(double{}); break;
    case FD_F16: f(__half{}); break;
    case FD_BF16: f(__nv_bfloat16{}); break;
    default: break;
  }
}

}  // namespace cuda
}  // namespace fastdiff
