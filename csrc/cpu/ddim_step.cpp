// CPU DDIM step (DDIM eq. 12, sigma_t from eq. 16 scaled by eta; CFG fused, Ho & Salimans 2022
// eq. 6). Per-element math: fd_ddim_update in csrc/step_math.h. The row is read on the host.
#include <torch/library.h>

#include "../ops.h"
#include "cpu_common.h"

namespace fastdiff {
namespace cpu {
namespace {

template <typename S, bool CFG, NoiseSource N>
FD_MULTIVERSION void ddim_chunk(const FdStepArgs& a, const FdDdimCoefs<math_t<S>>& k, int64_t b, int64_t i, int64_t len,
                const float* __restrict normals) {
  using C = math_t<S>;
  const S* __restrict x = static_cast<const S*>(a.sample) + b * a.numel + i;
  const S* __restrict mu = static_cast<const S*>(a.model) + b * a.model_stride + i;
  const S* __restrict mc = CFG ? mu + a.cond_offset : mu;
  const S* __restrict given = N == kGivenNoise ? static_cast<const S*>(a.noise) + b * a.numel + i : nullptr;
  S* __restrict prev = static_cast<S*>(a.prev) + b * a.numel + i;
  S* __restrict x0_out = a.x0 != nullptr ? static_cast<S*>(a.x0) + b * a.numel + i : nullptr;
  const FdClip<C> clip = fd_clip(k.clip_mode, k.clip_range, a.threshold != nullptr ? C(a.threshold[b]) : C(1));
  const C w = C(a.guidance_scale);
  if (x0_out == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      C m = CFG ? fd_cfg(load(mu[j]), load(mc[j]), w) : load(mu[j]);
      C n = N == kPhiloxNoise ? C(normals[j]) : (N == kGivenNoise ? load(given[j]) : C(0));
      C p, x0;
      fd_ddim_update(k, clip, m, load(x[j]), n, p, x0);
      prev[j] = store<S>(p);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      C m = CFG ? fd_cfg(load(mu[j]), load(mc[j]), w) : load(mu[j]);
      C n = N == kPhiloxNoise ? C(normals[j]) : (N == kGivenNoise ? load(given[j]) : C(0));
      C p, x0;
      fd_ddim_update(k, clip, m, load(x[j]), n, p, x0);
      prev[j] = store<S>(p);
      x0_out[j] = store<S>(x0);
    }
  }
}

template <typename S, bool CFG, NoiseSource N>
void ddim_run(const FdStepArgs& a) {
  const auto k = fd_ddim_coefs<math_t<S>>(a.coefs, a.prediction, a.clip_mode, a.clip_range, a.eta, a.use_clipped);
  const uint32_t counter = fd_step_counter(a.coefs[FD_TIMESTEP]);
  for_each_range(a.batch, a.numel, [&](int64_t b, int64_t i0, int64_t i1) {
    for_each_chunk<N>(a, counter, FD_STREAM_STEP, b, i0, i1, [&](int64_t i, int64_t len, const float* normals) {
      ddim_chunk<S, CFG, N>(a, k, b, i, len, normals);
    });
  });
}

template <typename S, bool CFG>
void ddim_noise(const FdStepArgs& a) {
  switch (noise_source(a, false)) {  // add_noise is eta > 0 (DDIM: eta = 0 is deterministic)
    case kNoNoise: return ddim_run<S, CFG, kNoNoise>(a);
    case kGivenNoise: return ddim_run<S, CFG, kGivenNoise>(a);
    case kPhiloxNoise: return ddim_run<S, CFG, kPhiloxNoise>(a);
  }
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(const at::Tensor& model_output, const at::Tensor& sample,
                                                 const at::Tensor& coefs, const c10::optional<at::Tensor>& noise,
                                                 int64_t seed, int64_t sample_offset, int64_t prediction, double eta,
                                                 bool use_clipped_model_output,
                                                 c10::optional<double> clip_sample_range,
                                                 const c10::optional<at::Tensor>& threshold,
                                                 c10::optional<double> guidance_scale, bool write_x0) {
  StepPlan p = plan_ddim_step(model_output, sample, coefs, noise, seed, sample_offset, prediction, eta,
                              use_clipped_model_output, clip_sample_range, threshold, guidance_scale, write_x0);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using S = decltype(tag);
    p.args.cfg ? ddim_noise<S, true>(p.args) : ddim_noise<S, false>(p.args);
  });
  return finish2(p);
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_C, CPU, m) {
  m.impl("ddim_step", &fastdiff::cpu::ddim_step_cpu);
}
