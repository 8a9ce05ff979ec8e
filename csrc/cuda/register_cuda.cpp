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

void step(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& table, const at::Tensor& index,
          const at::Tensor& history, const at::Tensor& out, const c10::optional<at::Tensor>& x0_out,
          const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& seed, int64_t sample_offset,
          c10::optional<double> guidance_scale, const c10::optional<at::Tensor>& guidance_extra, double extra_scale,
          int64_t variance, c10::optional<double> clip_range, const c10::optional<at::Tensor>& threshold,
          int64_t history_reads, bool write_history, bool write_out2, bool advance) {
  c10::DeviceGuard guard(sample.device());
  StepPlan p = plan_step(model_output, sample, table, index, history, out, x0_out, noise, seed, sample_offset,
                         guidance_scale, guidance_extra, extra_scale, variance, clip_range, threshold, history_reads,
                         write_history, write_out2, advance);
  fd_launch_step(p.args, p.dtype, current_stream(sample));  // the kernel reads index and row on the device
  check_launch("step");
  finish(p);
}

void q_sample(const at::Tensor& x0, const at::Tensor& table, const at::Tensor& index,
              const c10::optional<at::Tensor>& noise, int64_t seed, int64_t sample_offset, const at::Tensor& x_t,
              const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& noise_out) {
  c10::DeviceGuard guard(x0.device());
  QSamplePlan p = plan_q_sample(x0, table, index, noise, seed, sample_offset, x_t, target, noise_out);
  fd_launch_q_sample(p.args, p.dtype, current_stream(x0));
  check_launch("q_sample");
  finish(p);
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
  m.impl("step", &fastdiff::cuda_impl::step);
  m.impl("q_sample", &fastdiff::cuda_impl::q_sample);
  m.impl("cfg_combine", &fastdiff::cuda_impl::cfg_combine);
  m.impl("philox_randn", &fastdiff::cuda_impl::philox_randn);
}
