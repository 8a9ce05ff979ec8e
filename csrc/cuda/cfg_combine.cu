// CUDA classifier-free guidance (Ho & Salimans 2022, eq. 6): out = u + w (c - u), fp32 math
// (fp64 for fp64), grid-stride over 16-byte packs when aligned.
#include "cuda_common.cuh"

namespace fastdiff {
namespace cuda {
namespace {

template <typename S, int VEC>
__global__ void cfg_kernel(FdCfgArgs a) {
  using C = math_t<S>;
  const C w = C(a.guidance_scale);
  const int64_t packs = a.numel / VEC;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += int64_t(gridDim.x) * blockDim.x) {
    const auto u = load_pack<VEC>(static_cast<const S*>(a.uncond) + p * VEC);
    const auto c = load_pack<VEC>(static_cast<const S*>(a.cond) + p * VEC);
    Pack<S, VEC> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) out.v[e] = from_math<S>(fd_cfg(C(to_math(u.v[e])), C(to_math(c.v[e])), w));
    store_pack<VEC>(static_cast<S*>(a.out) + p * VEC, out);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fastdiff

void fd_launch_cfg_combine(const FdCfgArgs& args, int dtype, void* stream) {
  using namespace fastdiff::cuda;
  if (args.numel == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    constexpr int vec = pack_of<S>();
    if (args.numel % vec == 0 && aligned16(args.uncond) && aligned16(args.cond) && aligned16(args.out))
      cfg_kernel<S, vec><<<blocks_for(args.numel / vec), kThreads, 0, s>>>(args);
    else
      cfg_kernel<S, 1><<<blocks_for(args.numel), kThreads, 0, s>>>(args);
  });
}
