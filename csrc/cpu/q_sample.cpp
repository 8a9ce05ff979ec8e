// CPU forward noising with per-sample timesteps (DDPM eq. 4) and the v target (Salimans & Ho
// 2022 sec. 4). sqrt(abar_t), sqrt(1 - abar_t) are computed per sample in float32 from the
// float32 table, as reference.q_sample_coefs does; in-kernel noise is rounded to x0's dtype first
// (reference: noise.randn(..., dtype=x0.dtype)).
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../ops.h"
#include "cpu_common.h"

namespace fastdiff {
namespace cpu {
namespace {

template <typename S, bool PHILOX>
FD_MULTIVERSION void q_sample_chunk(const FdQSampleArgs& a, math_t<S> ca, math_t<S> cb, int64_t b, int64_t i, int64_t len,
                    const float* __restrict normals) {
  const int64_t base = b * a.numel + i;
  const S* __restrict x0 = static_cast<const S*>(a.x0) + base;
  const S* __restrict given = PHILOX ? nullptr : static_cast<const S*>(a.noise) + base;
  S* __restrict x_t = static_cast<S*>(a.x_t) + base;
  S* __restrict noise_out = a.noise_out != nullptr ? static_cast<S*>(a.noise_out) + base : nullptr;
  S* __restrict v_out = a.v_out != nullptr ? static_cast<S*>(a.v_out) + base : nullptr;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    S n = PHILOX ? store<S>(normals[j]) : given[j];
    x_t[j] = store<S>(fd_q_sample(ca, cb, load(x0[j]), load(n)));
  }
  if (noise_out != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) noise_out[j] = PHILOX ? store<S>(normals[j]) : given[j];
  }
  if (v_out != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      S n = PHILOX ? store<S>(normals[j]) : given[j];
      v_out[j] = store<S>(fd_v_target(ca, cb, load(x0[j]), load(n)));
    }
  }
}

template <typename S, bool PHILOX>
void q_sample_run(const FdQSampleArgs& a, const std::vector<float>& sqrt_abar, const std::vector<float>& sqrt_1m) {
  using C = math_t<S>;
  for_each_range(a.batch, a.numel, [&](int64_t b, int64_t i0, int64_t i1) {
    const uint32_t sample = uint32_t(uint64_t(a.sample_offset + b));
    for_each_noise_chunk<PHILOX>(a.seed, sample, 0u, FD_STREAM_Q_SAMPLE, i0, i1,
                                 [&](int64_t i, int64_t len, const float* normals) {
                                   q_sample_chunk<S, PHILOX>(a, C(sqrt_abar[b]), C(sqrt_1m[b]), b, i, len, normals);
                                 });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> q_sample_cpu(const at::Tensor& x0, const at::Tensor& timesteps,
                                                            const at::Tensor& alphas_cumprod,
                                                            const c10::optional<at::Tensor>& noise, int64_t seed,
                                                            int64_t sample_offset, bool write_noise, bool write_v) {
  QSamplePlan p = plan_q_sample(x0, timesteps, alphas_cumprod, noise, seed, sample_offset, write_noise, write_v);
  const FdQSampleArgs& a = p.args;
  std::vector<float> sqrt_abar(a.batch), sqrt_1m(a.batch);
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t t = a.timesteps[b];
    TORCH_CHECK(t >= 0 && t < a.num_train_timesteps, "fastdiff_C::q_sample: timesteps[", b, "] must be in [0, ",
                a.num_train_timesteps, "), got ", t);
    const float abar = a.alphas_cumprod[t];
    sqrt_abar[b] = std::sqrt(abar);
    sqrt_1m[b] = std::sqrt(1.0f - abar);
  }
  dispatch_dtype(p.dtype, [&](auto tag) {
    using S = decltype(tag);
    a.noise != nullptr ? q_sample_run<S, false>(a, sqrt_abar, sqrt_1m) : q_sample_run<S, true>(a, sqrt_abar, sqrt_1m);
  });
  return finish3(p);
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_C, CPU, m) {
  m.impl("q_sample", &fastdiff::cpu::q_sample_cpu);
}
