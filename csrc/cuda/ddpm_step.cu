// CUDA DDPM reverse step (DDPM eq. 6-7; learned variance IDDPM eq. 15; CFG fused, Ho & Salimans
// 2022 eq. 6). Per-element math: fd_ddpm_update in csrc/step_math.h. The coefficient row is read
// from device memory inside the kernel: no host sync, CUDA-graph safe.
#include "cuda_common.cuh"

namespace fastdiff {
namespace cuda {
namespace {

// Grid-stride loop over Philox quads (4 elements of a sample, one fd_randn4 call; cuda_common.cuh).
// PACK: every quad is whole and aligned, moved with 4-element vector loads/stores.
template <typename S, bool PACK, bool CFG, int VAR, int NOISE>
__global__ void ddpm_kernel(FdStepArgs a) {
  using C = math_t<S>;
  constexpr bool LEARNED = VAR != FD_VAR_FIXED;
  float row[FD_WIDTH];
  for (int c = 0; c < FD_WIDTH; ++c) row[c] = __ldg(a.coefs + c);
  const auto k = fd_ddpm_coefs<C>(row, a.prediction, a.clip_mode, a.clip_range);
  const uint32_t counter = fd_step_counter(row[FD_TIMESTEP]);
  const bool draw = NOISE == 2 && (LEARNED || k.std != C(0));  // std 0 (t = 0): no noise to draw
  const C w = C(a.guidance_scale);
  const int64_t quads = quads_of(a.numel), items = a.batch * quads;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < items; t += int64_t(gridDim.x) * blockDim.x) {
    const QuadItem q = quad_item(t, quads, a.numel);
    const S* mu = static_cast<const S*>(a.model) + q.b * a.model_stride + q.i;
    const S* mc = CFG ? mu + a.cond_offset : mu;
    C x[4], u[4], c[4], v[4], n[4], prev[4], x0[4];
    load_quad<PACK>(static_cast<const S*>(a.sample) + q.idx, q.count, x);
    load_quad<PACK>(mu, q.count, u);
    if (CFG) load_quad<PACK>(mc, q.count, c);
    if (LEARNED) load_quad<PACK>(mc + a.var_offset, q.count, v);
    if (NOISE == 1) load_quad<PACK>(static_cast<const S*>(a.noise) + q.idx, q.count, n);
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (draw) fd_randn4(a.seed, uint32_t(q.q), uint32_t(uint64_t(a.sample_offset + q.b)), counter, FD_STREAM_STEP, z);
    const FdClip<C> clip = fd_clip(k.clip_mode, k.clip_range, a.threshold != nullptr ? C(a.threshold[q.b]) : C(1));
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const C m = CFG ? fd_cfg(u[e], c[e], w) : u[e];
      const C noise = NOISE == 1 ? n[e] : C(z[e]);
      fd_ddpm_update<VAR>(k, clip, m, LEARNED ? v[e] : C(0), x[e], noise, prev[e], x0[e]);
    }
    store_quad<PACK>(static_cast<S*>(a.prev) + q.idx, q.count, prev);
    if (a.x0 != nullptr) store_quad<PACK>(static_cast<S*>(a.x0) + q.idx, q.count, x0);
  }
}

template <typename S, bool PACK, bool CFG, int VAR>
void launch_noise(const FdStepArgs& a, cudaStream_t stream) {
  const unsigned blocks = blocks_for(a.batch * quads_of(a.numel));
  if (a.noise != nullptr)
    ddpm_kernel<S, PACK, CFG, VAR, 1><<<blocks, kThreads, 0, stream>>>(a);
  else  // a DDPM step always adds noise (validate.cpp); std 0 is skipped in the kernel
    ddpm_kernel<S, PACK, CFG, VAR, 2><<<blocks, kThreads, 0, stream>>>(a);
}

template <typename S, bool PACK, bool CFG>
void launch_variance(const FdStepArgs& a, cudaStream_t stream) {
  switch (a.variance_mode) {
    case FD_VAR_LEARNED: return launch_noise<S, PACK, CFG, FD_VAR_LEARNED>(a, stream);
    case FD_VAR_LEARNED_RANGE: return launch_noise<S, PACK, CFG, FD_VAR_LEARNED_RANGE>(a, stream);
    default: return launch_noise<S, PACK, CFG, FD_VAR_FIXED>(a, stream);
  }
}

template <typename S, bool PACK>
void launch_pack(const FdStepArgs& a, cudaStream_t stream) {
  a.cfg ? launch_variance<S, PACK, true>(a, stream) : launch_variance<S, PACK, false>(a, stream);
}

}  // namespace
}  // namespace cuda
}  // namespace fastdiff

void fd_launch_ddpm_step(const FdStepArgs& args, int dtype, void* stream) {
  using namespace fastdiff::cuda;
  if (args.batch * args.numel == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    can_pack<S>(args) ? launch_pack<S, true>(args, s) : launch_pack<S, false>(args, s);
  });
}
