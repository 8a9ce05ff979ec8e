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
