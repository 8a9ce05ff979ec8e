// ATen side shared by the CPU and CUDA implementations: input validation and the "plan" of a
// call (contiguous inputs in one storage dtype; outputs written directly when they are contiguous
// in that dtype and alias no input other than element for element, else through contiguous work
// buffers copied back by finish()).
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
  std::vector<Tensor> outputs;  // tensors receiving results: the caller's, or ones the op returns
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

// The generic step (fastdiff.ops, backend signature; fastdiff.eager is the ground truth). Outputs:
// out, x0_out (optional) and the history slots the row names (when written).
StepPlan plan_step(const Tensor& model_output, const Tensor& sample, const Tensor& table, const Tensor& index,
                   const Tensor& history, const Tensor& out, const c10::optional<Tensor>& x0_out,
                   const c10::optional<Tensor>& noise, const c10::optional<Tensor>& seed, int64_t sample_offset,
                   c10::optional<double> guidance_scale, const c10::optional<Tensor>& guidance_extra,
                   double extra_scale, int64_t variance, c10::optional<double> clip_range,
                   const c10::optional<Tensor>& threshold, int64_t history_reads, bool write_history,
                   bool write_out2, bool advance);

QSamplePlan plan_q_sample(const Tensor& x0, const Tensor& table, const Tensor& index,
                          const c10::optional<Tensor>& noise, int64_t seed, int64_t sample_offset, const Tensor& x_t,
                          const c10::optional<Tensor>& target, const c10::optional<Tensor>& noise_out);

CfgPlan plan_cfg_combine(const Tensor& uncond, const Tensor& cond, double guidance_scale);

// Philox op: normals (float32, like's shape) and, per element, the raw Philox word its normal comes
// from and that word's Box-Muller partner (int64 [2, *like.shape]; see FdPhiloxArgs).
std::tuple<Tensor, Tensor, FdPhiloxArgs> plan_philox_randn(const Tensor& like, int64_t seed, int64_t counter,
                                                           int64_t stream, int64_t sample_offset);

// Copies work buffers into outputs that are not themselves contiguous in the storage dtype.
void finish(OutputPlan& plan);

}  // namespace fastdiff
