// Plain argument structs handed from the ATen side (csrc/validate.cpp) to the CPU loops and the
// CUDA launchers. No ATen types: csrc/cuda/*.cu include only this and step_math.h.
#pragma once

#include <stdint.h>

// Storage dtypes of the tensors of one call (all inputs share one, see validate.cpp: storage_dtype).
enum FdDtype { FD_F32 = 0, FD_F64 = 1, FD_F16 = 2, FD_BF16 = 3 };

// The generic step. Every tensor is contiguous in the storage dtype. Sample b, element i
// (0 <= i < numel, NCHW order) of
//   sample / noise / out / x0           is at  b * numel + i
//   uncond (or only) model prediction   is at  b * model_stride + i
//   cond model prediction               is at  cond_offset + b * model_stride + i
//   model variance channels             is at  cond_offset + b * model_stride + var_offset + i
//   extra prediction (guidance_extra)   is at  b * extra_stride + i
//   history slot s                      is at  s * batch * numel + b * numel + i
// The row is row `*index` of `table` ([rows, FD_WIDTH] float32, on the tensors' device), the NaN
// sentinel row rows - 1 for an index outside [0, rows - 1). CPU: read on the host; CUDA: read by
// the kernel (no host sync, CUDA-graph safe).
struct FdStepArgs {
  const void* model;
  const void* sample;
  const void* noise;        // FD_NOISE_GIVEN: the noise; else nullptr
  const void* extra;        // FD_GUIDE_CFG_EXTRA: guidance_extra; else nullptr
  void* out;
  void* x0;                 // nullptr: not written
  void* history;            // [slots, batch, numel], or nullptr when the step neither reads nor writes it
  const float* table;       // [rows, FD_WIDTH]
  int64_t* index;           // [1]: the step index (incremented after the step when `advance`)
  const double* threshold;  // [batch] dynamic-thresholding s (FD_CLIP_THRESHOLD), else nullptr
  int64_t rows, slots, batch, numel, model_stride, cond_offset, var_offset, extra_stride;
  int guidance;             // FD_GUIDE_*
  int noise_source;         // FD_NOISE_*
  int variance;             // FD_VAR_*
  int clip_mode;            // FD_CLIP_*
  int history_reads;        // 0..FD_MAX_HISTORY_READS
  int write_out2, write_history, advance;
  double clip_range, guidance_scale, extra_scale;
  const int64_t* seed;      // [1] the Philox key, on the tensors' device (read when the step draws noise)
  int64_t sample_offset;
};

// q_sample: per sample b, row fd_row_index(index[b], rows) of `table` ([rows, FD_Q_WIDTH] float32).
struct FdQSampleArgs {
  const void* x0;
  const void* noise;        // nullptr: in-kernel Philox noise (counter 0, stream FD_STREAM_Q_SAMPLE)
  void* x_t;
  void* target;             // nullptr: not written
  void* noise_out;          // nullptr: not written
  const float* table;       // [rows, FD_Q_WIDTH], on the tensors' device
  const int64_t* index;     // [batch], on the tensors' device
  int64_t rows, batch, numel;
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
void fd_launch_step(const FdStepArgs& args, int dtype, void* stream);
void fd_launch_q_sample(const FdQSampleArgs& args, int dtype, void* stream);
void fd_launch_cfg_combine(const FdCfgArgs& args, int dtype, void* stream);
void fd_launch_philox_randn(const FdPhiloxArgs& args, void* stream);
