// TORCH_LIBRARY_IMPL(fastdiff_C, CUDA): validation and output layout from csrc/validate.cpp, then
// the launchers of csrc/cuda/*.cu on the current stream. Host C++ with only device-generic ATen
// headers (c10::Stream::native_handle), so it compiles with any torch's headers; the .cu files
// include no ATen at all (fast nvcc builds, and CI compiles them standalone for sm_80/sm_90).
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../ops.h"

namespace fastdiff {
namespace cuda_impl {
namespace {

void* current_stream(const at::Tensor& t) {
  return c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(t.device()).native_handle();
}

void check_launch(const char* op) {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, "fastdiff_C::", op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

std::tuple<at::Tensor, at::Tensor> ddpm_step(const at::Tensor& model_output, const at::Tensor& sample,
                                             const at::Tensor& coefs, const c10::optional<at::Tensor>& noise,
                                             int64_t seed, int64_t sample_offset, int64_t prediction,
                                             int64_t variance_mode, c10::optional<double> clip_sample_range,
                                             const c10::optional<at::Tensor>& threshold,
                                             c10::optional<double> guidance_scale, bool write_x0) {
  c10::DeviceGuard guard(sample.device());
  StepPlan p = plan_ddpm_step(model_output, sample, coefs, noise, seed, sample_offset, prediction, variance_mode,
                              clip_sample_range, threshold, guidance_scale, write_x0);
  fd_launch_ddpm_step(p.args, p.dtype, current_stream(sample));
  check_launch("ddpm_step");
  return finish2(p);
}

std::tuple<at::Tensor, at::Tensor> ddim_step(const at::Tensor& model_output, const at::Tensor& sample,
                                             const at::Tensor& coefs, const c10::optional<at::Tensor>& noise,
                                             int64_t seed, int64_t sample_offset, int64_t prediction, double eta,
                                             bool use_clipped_model_output, c10::optional<double> clip_sample_range,
                                             const c10::optional<at::Tensor>& threshold,
                                             c10::optional<double> guidance_scale, bool write_x0) {
  c10::DeviceGuard guard(sample.device());
  StepPlan p = plan_ddim_step(model_output, sample, coefs, noise, seed, sample_offset, prediction, eta,
                              use_clipped_model_output, clip_sample_range, threshold, guidance_scale, write_x0);
  fd_launch_ddim_step(p.args, p.dtype, current_stream(sample));
  check_launch("ddim_step");
  return finish2(p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> q_sample(const at::Tensor& x0, const at::Tensor& timesteps,
                                                        const at::Tensor& alphas_cumprod,
                                                        const c10::optional<at::Tensor>& noise, int64_t seed,
                                                        int64_t sample_offset, bool write_noise, bool write_v) {
  c10::DeviceGuard guard(x0.device());
  QSamplePlan p = plan_q_sample(x0, timesteps, alphas_cumprod, noise, seed, sample_offset, write_noise, write_v);
  fd_launch_q_sample(p.args, p.dtype, current_stream(x0));
  check_launch("q_sample");
  return finish3(p);
}

at::Tensor cfg_combine(const at::Tensor& uncond, const at::Tensor& cond, double guidance_scale) {
  c10::DeviceGuard guard(cond.device());
  CfgPlan p = plan_cfg_combine(uncond, cond, guidance_scale);
  fd_launch_cfg_combine(p.args, p.dtype, current_stream(cond));
  check_launch("cfg_combine");
  finish(p);
  return p.outputs[0];
}

std::tuple<at::Tensor, at::Tensor> philox_randn(const at::Tensor& like, int64_t seed, int64_t counter,
                                                int64_t stream, int64_t sample_offset) {
  c10::DeviceGuard guard(like.device());
  auto [normal, bits, args] = plan_philox_randn(like, seed, counter, stream, sample_offset);
  fd_launch_philox_randn(args, current_stream(like));
  check_launch("philox_randn");
  return {normal, bits};
}

}  // namespace
}  // namespace cuda_impl
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_C, CUDA, m) {
  m.impl("ddpm_step", &fastdiff::cuda_impl::ddpm_step);
  m.impl("ddim_step", &fastdiff::cuda_impl::ddim_step);
  m.impl("q_sample", &fastdiff::cuda_impl::q_sample);
  m.impl("cfg_combine", &fastdiff::cuda_impl::cfg_combine);
  m.impl("philox_randn", &fastdiff::cuda_impl::philox_randn);
}
