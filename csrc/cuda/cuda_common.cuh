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

// A step's quads can all move as 4-element vectors: whole quads, every pointer 4-element aligned.
template <typename S>
bool can_pack(const FdStepArgs& a) {
  return a.numel % 4 == 0 && quad_aligned<S>(a.model) && quad_aligned<S>(a.sample) && quad_aligned<S>(a.prev) &&
         quad_aligned<S>(a.noise) && quad_aligned<S>(a.x0);
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

// Grid for a grid-stride loop over `work` items: enough blocks to fill the GPU, no more.
inline unsigned blocks_for(int64_t work) {
  int device = 0, sms = 80;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
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
