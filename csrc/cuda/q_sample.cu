// CUDA forward noising with per-sample timesteps (DDPM eq. 4) and the v target (Salimans & Ho
// 2022 sec. 4). sqrt(abar_t), sqrt(1 - abar_t) in float32 from the float32 table, gathered in the
// kernel (no host sync); a timestep outside [0, T) gives NaN outputs for its sample. In-kernel
// noise is rounded to x0's dtype first (reference: noise.randn(..., dtype=x0.dtype)).
#include "cuda_common.cuh"

namespace fastdiff {
namespace cuda {
namespace {

// Grid-stride loop over Philox quads (cuda_common.cuh): one fd_randn4 call per 4 elements.
template <typename S, bool PACK, bool PHILOX>
__global__ void q_sample_kernel(FdQSampleArgs a) {
  using C = math_t<S>;
  const int64_t quads = quads_of(a.numel), items = a.batch * quads;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < items; t += int64_t(gridDim.x) * blockDim.x) {
    const QuadItem q = quad_item(t, quads, a.numel);
    const int64_t step = a.timesteps[q.b];
    const float abar =
        (step >= 0 && step < a.num_train_timesteps) ? a.alphas_cumprod[step] : __int_as_float(0x7fc00000);
    const C ca = C(sqrtf(abar)), cb = C(sqrtf(1.0f - abar));
    C x0[4], n[4], x_t[4], v[4];
    load_quad<PACK>(static_cast<const S*>(a.x0) + q.idx, q.count, x0);
    if (PHILOX) {
      float z[4];
      fd_randn4(a.seed, uint32_t(q.q), uint32_t(uint64_t(a.sample_offset + q.b)), 0u, FD_STREAM_Q_SAMPLE, z);
#pragma unroll
      for (int e = 0; e < 4; ++e) n[e] = C(to_math(from_math<S>(C(z[e]))));  // rounded to S first
    } else {
      load_quad<PACK>(static_cast<const S*>(a.noise) + q.idx, q.count, n);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      x_t[e] = fd_q_sample(ca, cb, x0[e], n[e]);
      v[e] = fd_v_target(ca, cb, x0[e], n[e]);
    }
    store_quad<PACK>(static_cast<S*>(a.x_t) + q.idx, q.count, x_t);
    if (a.noise_out != nullptr) store_quad<PACK>(static_cast<S*>(a.noise_out) + q.idx, q.count, n);
    if (a.v_out != nullptr) store_quad<PACK>(static_cast<S*>(a.v_out) + q.idx, q.count, v);
  }
}

template <typename S>
bool can_pack(const FdQSampleArgs& a) {
  return a.numel % 4 == 0 && quad_aligned<S>(a.x0) && quad_aligned<S>(a.noise) && quad_aligned<S>(a.x_t) &&
         quad_aligned<S>(a.noise_out) && quad_aligned<S>(a.v_out);
}

template <typename S, bool PACK>
void launch_pack(const FdQSampleArgs& a, cudaStream_t stream) {
  const unsigned blocks = blocks_for(a.batch * quads_of(a.numel));
  if (a.noise == nullptr)
    q_sample_kernel<S, PACK, true><<<blocks, kThreads, 0, stream>>>(a);
  else
    q_sample_kernel<S, PACK, false><<<blocks, kThreads, 0, stream>>>(a);
}

}  // namespace
}  // namespace cuda
}  // namespace fastdiff

void fd_launch_q_sample(const FdQSampleArgs& args, int dtype, void* stream) {
  using namespace fastdiff::cuda;
  if (args.batch * args.numel == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    can_pack<S>(args) ? launch_pack<S, true>(args, s) : launch_pack<S, false>(args, s);
  });
}
