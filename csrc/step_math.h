// Per-element math of every fastdiff op, shared by the CPU loops (csrc/cpu) and the CUDA kernels
// (csrc/cuda): one copy of the arithmetic. It is fastdiff.reference.step / q_sample term for term
// and in the same order (sums left to right), so with -ffp-contract=off CPU fp32 results equal the
// reference to rounding of libm functions; GPU results differ by FMA contraction only.
// C is the math type: float, or double for float64 tensors. No ATen here (nvcc compiles it alone).
//
// The generic step of one row (fastdiff/tables.py, module docstring):
//   m    = u + w (c - u) [+ w2 (c - e)]        guidance (none / CFG / CFG plus an extra term)
//   x    = sample + PRE_NOISE n                (when the step has noise)
//   x0   = clamp((X0_X x + X0_M m) X0_SCALE, lo, hi) / div
//   out  = OUT_X x + OUT_M m + OUT_X0 x0 + OUT_H1 h1 + ... + OUT_H4 h4 [+ std n]
//   out2 = OUT2_X x + OUT2_M m + OUT2_X0 x0 + OUT2_H1 h1 + ... + OUT2_H4 h4
//   hist = HIST_X x + HIST_M m + HIST_X0 x0
// Terms a call does not have are made exact no-ops rather than separate code: an unused history
// read is h = +0 with coefficient -0 (its product is -0, and a + (-0) == a bit for bit for every a,
// -0 and NaN included), and so is the noise of a kernel that always evaluates the noise terms.
#pragma once

#include <math.h>
#include <stdint.h>

#include "step_coefs.h"

#if defined(__CUDACC__)
#define FD_HOST_DEVICE __host__ __device__
#else
#define FD_HOST_DEVICE
#endif

#include "philox.h"

// Guidance kinds (a template parameter of the CPU loops, a uniform branch on the GPU).
#define FD_GUIDE_NONE 0
#define FD_GUIDE_CFG 1
#define FD_GUIDE_CFG_EXTRA 2

// Noise sources of a step: none, a given tensor, in-kernel Philox.
#define FD_NOISE_NONE 0
#define FD_NOISE_GIVEN 1
#define FD_NOISE_PHILOX 2

// Clipping of x0: none, clamp to [-range, range], dynamic thresholding (clamp to [-s, s], then / s;
// Imagen sec. 2.3), which wins over clipping (as fastdiff.reference.clip_x0).
#define FD_CLIP_NONE 0
#define FD_CLIP_RANGE 1
#define FD_CLIP_THRESHOLD 2

// NaN-propagating clamp (torch.clamp semantics; std::min/max would drop a NaN).
template <typename C>
FD_HOST_DEVICE inline C fd_clamp(C v, C lo, C hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename C>
FD_HOST_DEVICE inline C fd_sqrt(C v) {
  return sqrt(v);
}
template <>
FD_HOST_DEVICE inline float fd_sqrt<float>(float v) {
  return sqrtf(v);
}
template <typename C>
FD_HOST_DEVICE inline C fd_exp(C v) {
  return exp(v);
}
template <>
FD_HOST_DEVICE inline float fd_exp<float>(float v) {
  return expf(v);
}

// The -0.0 of C: the identity of IEEE addition (coefficient of a term that must not change a sum).
template <typename C>
FD_HOST_DEVICE inline C fd_neg_zero() {
  return -C(0);
}

// ---- the row: which row, which history slots, which noise counter ----------------------------

// The row a step reads for device index `index` of a table with `rows` rows: itself inside
// [0, rows - 1), else the NaN sentinel row rows - 1 (fastdiff.tables.row_index).
FD_HOST_DEVICE inline int64_t fd_row_index(int64_t index, int64_t rows) {
  return (index >= 0 && index < rows - 1) ? index : rows - 1;
}

// A history slot number stored in a row as a float, as an index into [0, slots): truncated like
// int(), clamped into the buffer; NaN (the sentinel row) and negative values give slot 0, so a
// bad row can never read or write out of bounds (fastdiff.eager._slots).
FD_HOST_DEVICE inline int64_t fd_history_slot(float v, int64_t slots) {
  if (!(v >= 1.0f)) return 0;  // NaN, negative, [0, 1)
  if (v >= float(slots - 1)) return slots > 0 ? slots - 1 : 0;
  return int64_t(v);
}

// The Philox counter of a row: int(row[NOISE_COUNTER]) modulo 2^32 (fastdiff.eager._noise: a NaN
// row gives 0; the stream keeps the low 32 bits of the int64 counter).
FD_HOST_DEVICE inline uint32_t fd_row_counter(float v) {
  if (!(v == v) || !(v > -9.2e18f && v < 9.2e18f)) return 0u;
  return uint32_t(uint64_t(int64_t(v)));
}

// ---- per-step scalars -------------------------------------------------------------------------

// The coefficients of one row in the math type. history_reads (0..4) of the step's reads are real;
// the others get coefficient -0 (their h is +0: the product is -0, a no-op in a sum).
template <typename C>
struct FdStepCoefs {
  C x0_x, x0_m, x0_scale, pre_noise;
  C out_x, out_m, out_x0, out_h[FD_MAX_HISTORY_READS];
  C noise_std, var_bias, var_slope;
  C out2_x, out2_m, out2_x0, out2_h[FD_MAX_HISTORY_READS];
  C hist_x, hist_m, hist_x0;
};

template <typename C>
FD_HOST_DEVICE inline FdStepCoefs<C> fd_step_coefs(const float* row, int history_reads) {
  FdStepCoefs<C> k;
  k.x0_x = C(row[FD_X0_X]);
  k.x0_m = C(row[FD_X0_M]);
  k.x0_scale = C(row[FD_X0_SCALE]);
  k.pre_noise = C(row[FD_PRE_NOISE]);
  k.out_x = C(row[FD_OUT_X]);
  k.out_m = C(row[FD_OUT_M]);
  k.out_x0 = C(row[FD_OUT_X0]);
  k.noise_std = C(row[FD_NOISE_STD]);
  k.var_bias = C(row[FD_VAR_BIAS]);
  k.var_slope = C(row[FD_VAR_SLOPE]);
  k.out2_x = C(row[FD_OUT2_X]);
  k.out2_m = C(row[FD_OUT2_M]);
  k.out2_x0 = C(row[FD_OUT2_X0]);
  k.hist_x = C(row[FD_HIST_X]);
  k.hist_m = C(row[FD_HIST_M]);
  k.hist_x0 = C(row[FD_HIST_X0]);
  for (int j = 0; j < FD_MAX_HISTORY_READS; ++j) {
    const bool read = j < history_reads;
    k.out_h[j] = read ? C(row[FD_OUT_H1 + j]) : fd_neg_zero<C>();
    k.out2_h[j] = read ? C(row[FD_OUT2_H1 + j]) : fd_neg_zero<C>();
  }
  return k;
}

// x0 clipping of one sample: x0 = clamp(x0, lo, hi) / div (div = 1 except for thresholding; x / 1
// is exact). s is the sample's threshold (used in FD_CLIP_THRESHOLD mode only).
template <typename C>
struct FdClip {
  C lo, hi, div;
};

template <typename C>
FD_HOST_DEVICE inline FdClip<C> fd_clip(int mode, double clip_range, C s) {
  if (mode == FD_CLIP_THRESHOLD) return {-s, s, s};
  if (mode == FD_CLIP_RANGE) return {-C(clip_range), C(clip_range), C(1)};
  return {C(-INFINITY), C(INFINITY), C(1)};
}

// ---- per-element math ---------------------------------------------------------------------------

// Classifier-free guidance, Ho & Salimans 2022 eq. 6: u + w (c - u).
template <typename C>
FD_HOST_DEVICE inline C fd_cfg(C u, C c, C w) {
  return u + w * (c - u);
}

// The guided prediction m (fastdiff.reference.guide): c; u + w (c - u); or that + w2 (c - e)
// (SD3 skip-layer guidance: e is the extra prediction).
template <int G, typename C>
FD_HOST_DEVICE inline C fd_guide(C u, C c, C e, C w, C w2) {
  if (G == FD_GUIDE_NONE) return c;
  C m = fd_cfg(u, c, w);
  if (G == FD_GUIDE_CFG_EXTRA) m = m + w2 * (c - e);
  return m;
}

// Per-element noise std (fastdiff.reference.noise_std) from the model's variance channel v:
// fixed: NOISE_STD; sqrt: NOISE_STD sqrt(max(v, 0)); exp: NOISE_STD exp(VAR_BIAS + VAR_SLOPE v).
template <int VAR, typename C>
FD_HOST_DEVICE inline C fd_noise_std(const FdStepCoefs<C>& k, C v) {
  if (VAR == FD_VAR_SQRT) return k.noise_std * fd_sqrt(v < C(0) ? C(0) : v);
  if (VAR == FD_VAR_EXP) return k.noise_std * fd_exp(k.var_bias + k.var_slope * v);
  return k.noise_std;
}

template <typename C>
FD_HOST_DEVICE inline C fd_noise_std_mode(int mode, const FdStepCoefs<C>& k, C v) {
  if (mode == FD_VAR_SQRT) return fd_noise_std<FD_VAR_SQRT>(k, v);
  if (mode == FD_VAR_EXP) return fd_noise_std<FD_VAR_EXP>(k, v);
  return k.noise_std;
}

// The outputs of one element of a step.
template <typename C>
struct FdStepOut {
  C out, x0, out2, hist;
};

// One element of the generic step (fastdiff.reference.step). NOISE: the step has noise n with std
// `std` (the pre-noise and std terms); NH: 0 (no history terms; out2 and hist are not computed) or
// 4 (h1 .. h4, unused ones made neutral by their coefficients). Scalars, not arrays, so the CPU
// loops vectorise.
template <int NH, bool NOISE, typename C>
FD_HOST_DEVICE inline FdStepOut<C> fd_step_element(const FdStepCoefs<C>& k, const FdClip<C>& clip, C x, C m, C n,
                                                   C std, C h1, C h2, C h3, C h4) {
  static_assert(NH == 0 || NH == FD_MAX_HISTORY_READS, "history terms: none or all four");
  FdStepOut<C> r;
  if (NOISE) x = x + k.pre_noise * n;
  r.x0 = fd_clamp((k.x0_x * x + k.x0_m * m) * k.x0_scale, clip.lo, clip.hi) / clip.div;
  C o = k.out_x * x + k.out_m * m;
  o = o + k.out_x0 * r.x0;
  if (NH > 0) {
    o = o + k.out_h[0] * h1;
    o = o + k.out_h[1] * h2;
    o = o + k.out_h[2] * h3;
    o = o + k.out_h[3] * h4;
  }
  if (NOISE) o = o + std * n;
  r.out = o;
  if (NH > 0) {
    C o2 = k.out2_x * x + k.out2_m * m;
    o2 = o2 + k.out2_x0 * r.x0;
    o2 = o2 + k.out2_h[0] * h1;
    o2 = o2 + k.out2_h[1] * h2;
    o2 = o2 + k.out2_h[2] * h3;
    o2 = o2 + k.out2_h[3] * h4;
    r.out2 = o2;
    C hs = k.hist_x * x + k.hist_m * m;
    r.hist = hs + k.hist_x0 * r.x0;
  } else {
    r.out2 = C(0);
    r.hist = C(0);
  }
  return r;
}

// Forward noising and its target with one q-sample row (fastdiff.reference.q_sample):
// x_t = Q_A x0 + Q_B n, target = Q_P x0 + Q_Q n (DDPM eq. 4 and its relatives).
template <typename C>
FD_HOST_DEVICE inline C fd_lin2(C a, C x, C b, C n) {
  return a * x + b * n;
}
