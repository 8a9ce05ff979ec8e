// CUDA forward noising with per-sample timesteps (DDPM eq. 4) and the v target (Salimans & Ho
// 2022 sec. 4). sqrt(abar_t), sqrt(1 - abar_t) in float32 from the float32 table, gathered in the
// kernel (no host sync); a timestep outside [0, T) gives NaN outputs for its sample. In-kernel
// noise is rounded to x0's dtype first (reference: noise.randn(..., dtype=x0.dtype)).
#include "cuda_common.cuh"

namespace fastdiff {
namespace cuda {
namespace {

template <typename S, bool PHILOX>
__global__ void q_sample_kernel(FdQSampleArgs a) {
  using C = math_t<S>;
  const int64_t total = a.batch * a.numel;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / a.numel, i = idx - b * a.numel, t = a.timesteps[b];
    const float abar = (t >= 0 && t < a.num_train_timesteps) ? a.alphas_cumprod[t] : __int_as_float(0x7fc00000);
    const C ca = C(sqrtf(abar)), cb = C(sqrtf(1.0f - abar));
    const S n = PHILOX ? from_math<S>(math_t<S>(fd_randn(a.seed, uint32_t(i), uint32_t(uint64_t(a.sample_offset + b)),
                                                         0u, FD_STREAM_Q_SAMPLE)))
                       : static_cast<const S*>(a.noise)[idx];
    const C x0 = C(to_math(static_cast<const S*>(a.x0)[idx])), nm = C(to_math(n));
    static_cast<S*>(a.x_t)[idx] = from_math<S>(fd_q_sample(ca, cb, x0, nm));
    if (a.noise_out != nullptr) static_cast<S*>(a.noise_out)[idx] = n;
    if (a.v_out != nullptr) static_cast<S*>(a.v_out)[idx] = from_math<S>(fd_v_target(ca, cb, x0, nm));
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fastdiff

void fd_launch_q_sample(const FdQSampleArgs& args, int dtype, void* stream) {
  using namespace fastdiff::cuda;
  const int64_t total = args.batch * args.numel;
  if (total == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    if (args.noise == nullptr)
      q_sample_kernel<S, true><<<blocks_for(total), kThreads, 0, s>>>(args);
    else
      q_sample_kernel<S, false><<<blocks_for(total), kThreads, 0, s>>>(args);
  });
}
