// CPU DDPM reverse step (DDPM eq. 6-7; learned variance IDDPM eq. 15; CFG fused, Ho & Salimans
// 2022 eq. 6). Per-element math: fd_ddpm_update in csrc/step_math.h. The coefficient row is read
// on the host once per call (a CPU tensor here).
#include <torch/library.h>

#include "../ops.h"
#include "cpu_common.h"

namespace fastdiff {
namespace cpu {
namespace {

// One chunk [i, i + len) of sample b. The prediction type and clip mode are folded into
// coefficients (k, clip) and the variance mode is a template parameter, so the loop body is
// branch-free and vectorises.
template <typename S, bool CFG, int VAR, NoiseSource N>
FD_MULTIVERSION void ddpm_chunk(const FdStepArgs& a, const FdDdpmCoefs<math_t<S>>& k, int64_t b, int64_t i, int64_t len,
                const float* __restrict normals) {
  using C = math_t<S>;
  const S* __restrict x = static_cast<const S*>(a.sample) + b * a.numel + i;
  const S* __restrict mu = static_cast<const S*>(a.model) + b * a.model_stride + i;  // uncond (or only) half
  const S* __restrict mc = CFG ? mu + a.cond_offset : mu;                              // cond half
  const S* __restrict var = mc + a.var_offset;  // IDDPM: variance channels after the prediction's
  const S* __restrict given = N == kGivenNoise ? static_cast<const S*>(a.noise) + b * a.numel + i : nullptr;
  S* __restrict prev = static_cast<S*>(a.prev) + b * a.numel + i;
  S* __restrict x0_out = a.x0 != nullptr ? static_cast<S*>(a.x0) + b * a.numel + i : nullptr;
  const FdClip<C> clip = fd_clip(k.clip_mode, k.clip_range, a.threshold != nullptr ? C(a.threshold[b]) : C(1));
  const C w = C(a.guidance_scale);
  constexpr bool LEARNED = VAR != FD_VAR_FIXED;
  if (x0_out == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      C m = CFG ? fd_cfg(load(mu[j]), load(mc[j]), w) : load(mu[j]);
      C v = LEARNED ? load(var[j]) : C(0);
      C n = N == kPhiloxNoise ? C(normals[j]) : (N == kGivenNoise ? load(given[j]) : C(0));
      C p, x0;
      fd_ddpm_update<VAR>(k, clip, m, v, load(x[j]), n, p, x0);
      prev[j] = store<S>(p);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      C m = CFG ? fd_cfg(load(mu[j]), load(mc[j]), w) : load(mu[j]);
      C v = LEARNED ? load(var[j]) : C(0);
      C n = N == kPhiloxNoise ? C(normals[j]) : (N == kGivenNoise ? load(given[j]) : C(0));
      C p, x0;
      fd_ddpm_update<VAR>(k, clip, m, v, load(x[j]), n, p, x0);
      prev[j] = store<S>(p);
      x0_out[j] = store<S>(x0);
    }
  }
}

template <typename S, bool CFG, int VAR, NoiseSource N>
void ddpm_run(const FdStepArgs& a) {
  const auto k = fd_ddpm_coefs<math_t<S>>(a.coefs, a.prediction, a.clip_mode, a.clip_range);
  const uint32_t counter = fd_step_counter(a.coefs[FD_TIMESTEP]);
  for_each_range(a.batch, a.numel, [&](int64_t b, int64_t i0, int64_t i1) {
    for_each_chunk<N>(a, counter, FD_STREAM_STEP, b, i0, i1, [&](int64_t i, int64_t len, const float* normals) {
      ddpm_chunk<S, CFG, VAR, N>(a, k, b, i, len, normals);
    });
  });
}

template <typename S, bool CFG, int VAR>
void ddpm_noise(const FdStepArgs& a) {
  // A fixed-variance step with std 0 (t = 0) adds 0 * noise: skip drawing it.
  bool zero_std = VAR == FD_VAR_FIXED && a.coefs[FD_DDPM_STD] == 0.0f;
  switch (noise_source(a, zero_std)) {
    case kNoNoise: return ddpm_run<S, CFG, VAR, kNoNoise>(a);
    case kGivenNoise: return ddpm_run<S, CFG, VAR, kGivenNoise>(a);
    case kPhiloxNoise: return ddpm_run<S, CFG, VAR, kPhiloxNoise>(a);
  }
}

template <typename S, bool CFG>
void ddpm_variance(const FdStepArgs& a) {
  switch (a.variance_mode) {
    case FD_VAR_LEARNED: return ddpm_noise<S, CFG, FD_VAR_LEARNED>(a);
    case FD_VAR_LEARNED_RANGE: return ddpm_noise<S, CFG, FD_VAR_LEARNED_RANGE>(a);
    default: return ddpm_noise<S, CFG, FD_VAR_FIXED>(a);
  }
}

template <typename S>
void ddpm_dispatch(const FdStepArgs& a) {
  a.cfg ? ddpm_variance<S, true>(a) : ddpm_variance<S, false>(a);
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                 const at::Tensor& coefs, const c10::optional<at::Tensor>& noise,
                                                 int64_t seed, int64_t sample_offset, int64_t prediction,
                                                 int64_t variance_mode, c10::optional<double> clip_sample_range,
                                                 const c10::optional<at::Tensor>& threshold,
                                                 c10::optional<double> guidance_scale, bool write_x0) {
  StepPlan p = plan_ddpm_step(model_output, sample, coefs, noise, seed, sample_offset, prediction, variance_mode,
                              clip_sample_range, threshold, guidance_scale, write_x0);
  dispatch_dtype(p.dtype, [&](auto tag) { ddpm_dispatch<decltype(tag)>(p.args); });
  return finish2(p);
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_C, CPU, m) {
  m.impl("ddpm_step", &fastdiff::cpu::ddpm_step_cpu);
}
