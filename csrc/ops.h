// ATen side shared by the CPU and CUDA implementations: input validation and the "plan" of a
// call (contiguous inputs in one storage dtype, outputs laid out as torch.empty_like(sample)).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

#include "step_args.h"

namespace fastdiff {

using at::Tensor;

// Outputs of a call and the contiguous buffers the kernels write them through.
struct OutputPlan {
  std::vector<Tensor> outputs;  // as returned: empty_like(like) or an empty (0,) tensor
  std::vector<Tensor> work;     // contiguous, storage dtype; == outputs[i] when that already is
  std::vector<Tensor> keep;     // converted inputs kept alive during the call
  int dtype = FD_F32;           // FdDtype of the storage the kernels see
};

struct StepPlan : OutputPlan {
  FdStepArgs args{};
};

struct QSamplePlan : OutputPlan {
  FdQSampleArgs args{};
};

struct CfgPlan : OutputPlan {
  FdCfgArgs args{};
};

StepPlan plan_ddpm_step(const Tensor& model_output, const Tensor& sample, const Tensor& coefs,
                        const c10::optional<Tensor>& noise, int64_t seed, int64_t sample_offset, int64_t prediction,
                        int64_t variance_mode, c10::optional<double> clip_sample_range,
                        const c10::optional<Tensor>& threshold, c10::optional<double> guidance_scale,
                        bool write_x0);

StepPlan plan_ddim_step(const Tensor& model_output, const Tensor& sample, const Tensor& coefs,
                        const c10::optional<Tensor>& noise, int64_t seed, int64_t sample_offset, int64_t prediction,
                        double eta, bool use_clipped_model_output, c10::optional<double> clip_sample_range,
                        const c10::optional<Tensor>& threshold, c10::optional<double> guidance_scale,
                        bool write_x0);

QSamplePlan plan_q_sample(const Tensor& x0, const Tensor& timesteps, const Tensor& alphas_cumprod,
                          const c10::optional<Tensor>& noise, int64_t seed, int64_t sample_offset, bool write_noise,
                          bool write_v);

CfgPlan plan_cfg_combine(const Tensor& uncond, const Tensor& cond, double guidance_scale);

// Philox op: normals (float32, like's shape) and, per element, the raw Philox word its normal comes
// from and that word's Box-Muller partner (int64 [2, *like.shape]; see FdPhiloxArgs).
std::tuple<Tensor, Tensor, FdPhiloxArgs> plan_philox_randn(const Tensor& like, int64_t seed, int64_t counter,
                                                           int64_t stream, int64_t sample_offset);

// Copies work buffers into outputs that are not themselves contiguous in the storage dtype.
void finish(OutputPlan& plan);

std::tuple<Tensor, Tensor> finish2(OutputPlan& plan);
std::tuple<Tensor, Tensor, Tensor> finish3(OutputPlan& plan);

}  // namespace fastdiff
