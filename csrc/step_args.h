// Plain argument structs handed from the ATen side (csrc/ops.cpp validation) to the CPU loops and
// the CUDA launchers. No ATen types: csrc/cuda/*.cu include only this and step_math.h.
#pragma once

#include <stdint.h>

// Storage dtypes of the tensors of one call (all inputs share one, see ops.cpp: plan_*).
enum FdDtype { FD_F32 = 0, FD_F64 = 1, FD_F16 = 2, FD_BF16 = 3 };

// Tensors are contiguous. Sample b, element i (0 <= i < numel, NCHW order) of
//   sample/noise/prev/x0 is at  b * numel + i
//   model prediction     is at  b * model_stride + i            (uncond half under CFG)
//   model cond half      is at  cond_offset + b * model_stride + i
//   model variance       is at  (the cond or only half) + var_offset + i   (learned variance)
struct FdStepArgs {
  const void* model;
  const void* sample;
  const void* noise;      // nullptr: in-kernel Philox noise with `seed`
  void* prev;
  void* x0;               // nullptr: not written
  const float* coefs;     // the row, [FD_WIDTH] float32, on the tensors' device
  const double* threshold;  // [batch] dynamic-thresholding s, on the tensors' device, or nullptr
  int64_t batch, numel, model_stride, cond_offset, var_offset;
  int prediction, variance_mode, clip_mode, cfg, use_clipped, add_noise;
  double clip_range, guidance_scale, eta;
  uint64_t seed;
  int64_t sample_offset;
};

struct FdQSampleArgs {
  const void* x0;
  const void* noise;      // nullptr: in-kernel Philox noise (counter 0, stream FD_STREAM_Q_SAMPLE)
  void* x_t;
  void* noise_out;        // nullptr: not written
  void* v_out;            // nullptr: not written
  const int64_t* timesteps;       // [batch], on the tensors' device
  const float* alphas_cumprod;    // [num_train_timesteps] float32, on the tensors' device
  int64_t num_train_timesteps, batch, numel;
  uint64_t seed;
  int64_t sample_offset;
};

struct FdCfgArgs {
  const void* uncond;
  const void* cond;
  void* out;
  int64_t numel;
  double guidance_scale;
};

struct FdPhiloxArgs {
  float* normal;    // [batch, numel]
  int64_t* bits;    // [2, batch, numel]: per element, its Philox word then the word's Box-Muller partner
                    // ((i0, i1) for element % 4 < 2, (i2, i3) else), as uint32 values
  int64_t batch, numel;
  uint64_t seed;
  int64_t sample_offset;
  uint32_t counter, stream;
};

// CUDA launchers (csrc/cuda/*.cu), called by csrc/cuda/register_cuda.cpp; stream is a cudaStream_t.
void fd_launch_ddpm_step(const FdStepArgs& args, int dtype, void* stream);
void fd_launch_ddim_step(const FdStepArgs& args, int dtype, void* stream);
void fd_launch_q_sample(const FdQSampleArgs& args, int dtype, void* stream);
void fd_launch_cfg_combine(const FdCfgArgs& args, int dtype, void* stream);
void fd_launch_philox_randn(const FdPhiloxArgs& args, void* stream);
