// CUDA DDIM step (DDIM eq. 12, sigma_t from eq. 16 scaled by eta; CFG fused, Ho & Salimans 2022
// eq. 6). Per-element math: fd_ddim_update in csrc/step_math.h. The row is read in the kernel.
#include "cuda_common.cuh"

namespace fastdiff {
namespace cuda {
namespace {

// NOISE: 0 none (eta = 0), 1 given tensor, 2 in-kernel Philox.
template <typename S, int VEC, bool CFG, int NOISE>
__global__ void ddim_kernel(FdStepArgs a) {
  using C = math_t<S>;
  float row[FD_WIDTH];
  for (int c = 0; c < FD_WIDTH; ++c) row[c] = __ldg(a.coefs + c);
  const auto k = fd_ddim_coefs<C>(row, a.prediction, a.clip_mode, a.clip_range, a.eta, a.use_clipped);
  const uint32_t counter = fd_step_counter(row[FD_TIMESTEP]);
  const C w = C(a.guidance_scale);
  const int64_t packs = a.batch * a.numel / VEC;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t idx = p * VEC, b = idx / a.numel, i = idx - b * a.numel;
    const S* mu = static_cast<const S*>(a.model) + b * a.model_stride + i;
    const auto x = load_pack<VEC>(static_cast<const S*>(a.sample) + idx);
    const auto u = load_pack<VEC>(mu);
    Pack<S, VEC> c, n, prev, x0;
    if (CFG) c = load_pack<VEC>(mu + a.cond_offset);
    if (NOISE == 1) n = load_pack<VEC>(static_cast<const S*>(a.noise) + idx);
    const C s = a.threshold != nullptr ? C(a.threshold[b]) : C(1);
    const uint32_t sample = uint32_t(uint64_t(a.sample_offset + b));
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      C m = CFG ? fd_cfg(to_math(u.v[e]), to_math(c.v[e]), w) : to_math(u.v[e]);
      C noise = NOISE == 1   ? C(to_math(n.v[e]))
                : NOISE == 2 ? C(fd_randn(a.seed, uint32_t(i + e), sample, counter, FD_STREAM_STEP))
                             : C(0);
      C pv, xv;
      fd_ddim_update(k, m, C(to_math(x.v[e])), noise, s, pv, xv);
      prev.v[e] = from_math<S>(pv);
      x0.v[e] = from_math<S>(xv);
    }
    store_pack<VEC>(static_cast<S*>(a.prev) + idx, prev);
    if (a.x0 != nullptr) store_pack<VEC>(static_cast<S*>(a.x0) + idx, x0);
  }
}

template <typename S, int VEC, bool CFG>
void launch_noise(const FdStepArgs& a, cudaStream_t stream) {
  const unsigned blocks = blocks_for(a.batch * a.numel / VEC);
  if (!a.add_noise)
    ddim_kernel<S, VEC, CFG, 0><<<blocks, kThreads, 0, stream>>>(a);
  else if (a.noise != nullptr)
    ddim_kernel<S, VEC, CFG, 1><<<blocks, kThreads, 0, stream>>>(a);
  else
    ddim_kernel<S, VEC, CFG, 2><<<blocks, kThreads, 0, stream>>>(a);
}

bool can_pack(const FdStepArgs& a, int vec) {
  return a.numel % vec == 0 && aligned16(a.model) && aligned16(a.sample) && aligned16(a.prev) &&
         (a.noise == nullptr || aligned16(a.noise)) && (a.x0 == nullptr || aligned16(a.x0));
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
    constexpr int vec = pack_of<S>();
    const bool pack = can_pack(args, vec);
    if (args.cfg)
      pack ? launch_noise<S, vec, true>(args, s) : launch_noise<S, 1, true>(args, s);
    else
      pack ? launch_noise<S, vec, false>(args, s) : launch_noise<S, 1, false>(args, s);
  });
}
