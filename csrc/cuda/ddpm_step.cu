// CUDA DDPM reverse step (DDPM eq. 6-7; learned variance IDDPM eq. 15; CFG fused, Ho & Salimans
// 2022 eq. 6). Per-element math: fd_ddpm_update in csrc/step_math.h. The coefficient row is read
// from device memory inside the kernel: no host sync, CUDA-graph safe.
#include "cuda_common.cuh"

namespace fastdiff {
namespace cuda {
namespace {

// Grid-stride loop over packs of VEC elements; a pack never crosses a sample (numel % VEC == 0).
template <typename S, int VEC, bool CFG, bool LEARNED, int NOISE>
__global__ void ddpm_kernel(FdStepArgs a) {
  using C = math_t<S>;
  float row[FD_WIDTH];
  for (int c = 0; c < FD_WIDTH; ++c) row[c] = __ldg(a.coefs + c);
  const auto k = fd_ddpm_coefs<C>(row, a.prediction, a.variance_mode, a.clip_mode, a.clip_range);
  const uint32_t counter = fd_step_counter(row[FD_TIMESTEP]);
  const bool draw = NOISE == 2 && (LEARNED || k.std != C(0));  // std 0 (t = 0): no noise to draw
  const C w = C(a.guidance_scale);
  const int64_t packs = a.batch * a.numel / VEC;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t idx = p * VEC, b = idx / a.numel, i = idx - b * a.numel;
    const S* mu = static_cast<const S*>(a.model) + b * a.model_stride + i;
    const S* mc = CFG ? mu + a.cond_offset : mu;
    const auto x = load_pack<VEC>(static_cast<const S*>(a.sample) + idx);
    const auto u = load_pack<VEC>(mu);
    Pack<S, VEC> c, v, n, prev, x0;
    if (CFG) c = load_pack<VEC>(mc);
    if (LEARNED) v = load_pack<VEC>(mc + a.var_offset);
    if (NOISE == 1) n = load_pack<VEC>(static_cast<const S*>(a.noise) + idx);
    const C s = a.threshold != nullptr ? C(a.threshold[b]) : C(1);
    const uint32_t sample = uint32_t(uint64_t(a.sample_offset + b));
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      C m = CFG ? fd_cfg(to_math(u.v[e]), to_math(c.v[e]), w) : to_math(u.v[e]);
      C var = LEARNED ? C(to_math(v.v[e])) : C(0);
      C noise = NOISE == 1 ? C(to_math(n.v[e]))
                           : (draw ? C(fd_randn(a.seed, uint32_t(i + e), sample, counter, FD_STREAM_STEP)) : C(0));
      C pv, xv;
      fd_ddpm_update(k, m, var, C(to_math(x.v[e])), noise, s, pv, xv);
      prev.v[e] = from_math<S>(pv);
      x0.v[e] = from_math<S>(xv);
    }
    store_pack<VEC>(static_cast<S*>(a.prev) + idx, prev);
    if (a.x0 != nullptr) store_pack<VEC>(static_cast<S*>(a.x0) + idx, x0);
  }
}

template <typename S, int VEC, bool CFG, bool LEARNED>
void launch_noise(const FdStepArgs& a, cudaStream_t stream) {
  const unsigned blocks = blocks_for(a.batch * a.numel / VEC);
  if (a.noise != nullptr)
    ddpm_kernel<S, VEC, CFG, LEARNED, 1><<<blocks, kThreads, 0, stream>>>(a);
  else
    ddpm_kernel<S, VEC, CFG, LEARNED, 2><<<blocks, kThreads, 0, stream>>>(a);
}

template <typename S, int VEC>
void launch_vec(const FdStepArgs& a, cudaStream_t stream) {
  const bool learned = a.variance_mode != FD_VAR_FIXED;
  if (a.cfg)
    learned ? launch_noise<S, VEC, true, true>(a, stream) : launch_noise<S, VEC, true, false>(a, stream);
  else
    learned ? launch_noise<S, VEC, false, true>(a, stream) : launch_noise<S, VEC, false, false>(a, stream);
}

// 16-byte packs when every tensor is aligned and no pack crosses a sample; else one element.
bool can_pack(const FdStepArgs& a, int vec) {
  return a.numel % vec == 0 && aligned16(a.model) && aligned16(a.sample) && aligned16(a.prev) &&
         (a.noise == nullptr || aligned16(a.noise)) && (a.x0 == nullptr || aligned16(a.x0));
}

}  // namespace
}  // namespace cuda
}  // namespace fastdiff

void fd_launch_ddpm_step(const FdStepArgs& args, int dtype, void* stream) {
  using namespace fastdiff::cuda;
  if (args.batch * args.numel == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    constexpr int vec = pack_of<S>();
    if (can_pack(args, vec))
      launch_vec<S, vec>(args, static_cast<cudaStream_t>(stream));
    else
      launch_vec<S, 1>(args, static_cast<cudaStream_t>(stream));
  });
}
