// CUDA DDIM step (DDIM eq. 12, sigma_t from eq. 16 scaled by eta; CFG fused, Ho & Salimans 2022
// eq. 6). Per-element math: fd_ddim_update in csrc/step_math.h. The row is read in the kernel.
#include "cuda_common.cuh"

namespace fastdiff {
namespace cuda {
namespace {

// Grid-stride loop over Philox quads (cuda_common.cuh). NOISE: 0 none (eta = 0), 1 given tensor,
// 2 in-kernel Philox (one fd_randn4 call per quad).
template <typename S, bool PACK, bool CFG, int NOISE>
__global__ void ddim_kernel(FdStepArgs a) {
  using C = math_t<S>;
  float row[FD_WIDTH];
  for (int c = 0; c < FD_WIDTH; ++c) row[c] = __ldg(a.coefs + c);
  const auto k = fd_ddim_coefs<C>(row, a.prediction, a.clip_mode, a.clip_range, a.eta, a.use_clipped);
  const uint32_t counter = fd_step_counter(row[FD_TIMESTEP]);
  const C w = C(a.guidance_scale);
  const int64_t quads = quads_of(a.numel), items = a.batch * quads;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < items; t += int64_t(gridDim.x) * blockDim.x) {
    const QuadItem q = quad_item(t, quads, a.numel);
    const S* mu = static_cast<const S*>(a.model) + q.b * a.model_stride + q.i;
    C x[4], u[4], c[4], n[4], prev[4], x0[4];
    load_quad<PACK>(static_cast<const S*>(a.sample) + q.idx, q.count, x);
    load_quad<PACK>(mu, q.count, u);
    if (CFG) load_quad<PACK>(mu + a.cond_offset, q.count, c);
    if (NOISE == 1) load_quad<PACK>(static_cast<const S*>(a.noise) + q.idx, q.count, n);
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (NOISE == 2)
      fd_randn4(a.seed, uint32_t(q.q), uint32_t(uint64_t(a.sample_offset + q.b)), counter, FD_STREAM_STEP, z);
    const FdClip<C> clip = fd_clip(k.clip_mode, k.clip_range, a.threshold != nullptr ? C(a.threshold[q.b]) : C(1));
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const C m = CFG ? fd_cfg(u[e], c[e], w) : u[e];
      fd_ddim_update(k, clip, m, x[e], NOISE == 1 ? n[e] : C(z[e]), prev[e], x0[e]);
    }
    store_quad<PACK>(static_cast<S*>(a.prev) + q.idx, q.count, prev);
    if (a.x0 != nullptr) store_quad<PACK>(static_cast<S*>(a.x0) + q.idx, q.count, x0);
  }
}

template <typename S, bool PACK, bool CFG>
void launch_noise(const FdStepArgs& a, cudaStream_t stream) {
  const unsigned blocks = blocks_for(a.batch * quads_of(a.numel));
  if (!a.add_noise)
    ddim_kernel<S, PACK, CFG, 0><<<blocks, kThreads, 0, stream>>>(a);
  else if (a.noise != nullptr)
    ddim_kernel<S, PACK, CFG, 1><<<blocks, kThreads, 0, stream>>>(a);
  else
    ddim_kernel<S, PACK, CFG, 2><<<blocks, kThreads, 0, stream>>>(a);
}

}  // namespace
}  // namespace cuda
}  // namespace fastdiff

void fd_launch_ddim_step(const FdStepArgs& args, int dtype, void* stream) {
  using namespace fastdiff::cuda;
  if (args.batch * args.numel == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const bool pack = can_pack<S>(args);
    if (args.cfg)
      pack ? launch_noise<S, true, true>(args, s) : launch_noise<S, false, true>(args, s);
    else
      pack ? launch_noise<S, true, false>(args, s) : launch_noise<S, false, false>(args, s);
  });
}
