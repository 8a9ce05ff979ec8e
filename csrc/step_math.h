// Per-element math of every fastdiff op, shared by the CPU loops (csrc/cpu) and the CUDA kernels
// (csrc/cuda): one copy of the arithmetic. Each function mirrors fastdiff/reference.py, term for
// term and in the same order, so fp32 results differ from the reference only by FMA contraction.
// C is the math type: float, or double for float64 tensors. No ATen here (nvcc compiles it alone).
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

// Classifier-free guidance, Ho & Salimans 2022 eq. 6: u + w (c - u).
template <typename C>
FD_HOST_DEVICE inline C fd_cfg(C u, C c, C w) {
  return u + w * (c - u);
}

// x0 from the model output. epsilon: DDPM eq. 15; v: Salimans & Ho 2022 sec. 4.
template <typename C>
FD_HOST_DEVICE inline C fd_predict_x0(int pred, C m, C x, C sqrt_abar, C sqrt_1m_abar) {
  if (pred == FD_PRED_EPSILON) return (x - sqrt_1m_abar * m) / sqrt_abar;
  if (pred == FD_PRED_SAMPLE) return m;
  return sqrt_abar * x - sqrt_1m_abar * m;
}

// eps from the model output (DDIM eq. 12 needs it).
template <typename C>
FD_HOST_DEVICE inline C fd_predict_eps(int pred, C m, C x, C sqrt_abar, C sqrt_1m_abar) {
  if (pred == FD_PRED_EPSILON) return m;
  if (pred == FD_PRED_SAMPLE) return (x - sqrt_abar * m) / sqrt_1m_abar;
  return sqrt_abar * m + sqrt_1m_abar * x;
}

// Clip modes: none, clip to [-range, range], dynamic thresholding (Imagen sec. 2.3: clamp to
// [-s, s], divide by s, with s the per-sample threshold). Thresholding takes precedence.
#define FD_CLIP_NONE 0
#define FD_CLIP_RANGE 1
#define FD_CLIP_THRESHOLD 2

template <typename C>
FD_HOST_DEVICE inline C fd_clip_x0(int mode, C x0, C clip_range, C s) {
  if (mode == FD_CLIP_THRESHOLD) return fd_clamp(x0, -s, s) / s;
  if (mode == FD_CLIP_RANGE) return fd_clamp(x0, -clip_range, clip_range);
  return x0;
}

// Scalars of one DDPM step, read from the coefficient row (host or device) and the call.
template <typename C>
struct FdDdpmCoefs {
  C sqrt_abar, sqrt_1m_abar, c_x0, c_xt, std, min_log, max_log, clip_range;
  int pred, var_mode, clip_mode;
};

template <typename C>
FD_HOST_DEVICE inline FdDdpmCoefs<C> fd_ddpm_coefs(const float* row, int pred, int var_mode, int clip_mode,
                                                   double clip_range) {
  FdDdpmCoefs<C> k;
  k.sqrt_abar = C(row[FD_SQRT_ABAR]);
  k.sqrt_1m_abar = C(row[FD_SQRT_1M_ABAR]);
  k.c_x0 = C(row[FD_DDPM_C_X0]);
  k.c_xt = C(row[FD_DDPM_C_XT]);
  k.std = C(row[FD_DDPM_STD]);
  k.min_log = C(row[FD_DDPM_MIN_LOG]);
  k.max_log = C(row[FD_DDPM_MAX_LOG]);
  k.clip_range = C(clip_range);
  k.pred = pred;
  k.var_mode = var_mode;
  k.clip_mode = clip_mode;
  return k;
}

// Per-element noise std. fixed: the row's std. learned: std = sqrt(max(v, 0)) (our NaN policy).
// learned_range: IDDPM eq. 15, log var = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2.
template <typename C>
FD_HOST_DEVICE inline C fd_ddpm_std(const FdDdpmCoefs<C>& k, C v) {
  if (k.var_mode == FD_VAR_LEARNED) return k.std * fd_sqrt(v < C(0) ? C(0) : v);
  if (k.var_mode == FD_VAR_LEARNED_RANGE) {
    C frac = (v + C(1)) / C(2);
    C log_variance = frac * k.max_log + (C(1) - frac) * k.min_log;
    return k.std * fd_exp(C(0.5) * log_variance);
  }
  return k.std;
}

// DDPM reverse step (DDPM eq. 6-7, Algorithm 2): x0, then the posterior mean plus std * noise.
template <typename C>
FD_HOST_DEVICE inline void fd_ddpm_update(const FdDdpmCoefs<C>& k, C m, C v, C x, C noise, C s, C& prev,
                                          C& x0) {
  x0 = fd_clip_x0(k.clip_mode, fd_predict_x0(k.pred, m, x, k.sqrt_abar, k.sqrt_1m_abar), k.clip_range, s);
  C mean = k.c_x0 * x0 + k.c_xt * x;  // posterior mean, DDPM eq. 7
  prev = mean + fd_ddpm_std(k, v) * noise;
}

// Scalars of one DDIM step. std = eta sigma_t (DDIM eq. 16); the direction coefficient
// sqrt(1 - abar_prev - std^2) is clamped at 0 (eta > 1, our NaN policy).
template <typename C>
struct FdDdimCoefs {
  C sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, direction, std, clip_range;
  int pred, clip_mode, use_clipped;
};

template <typename C>
FD_HOST_DEVICE inline FdDdimCoefs<C> fd_ddim_coefs(const float* row, int pred, int clip_mode, double clip_range,
                                                   double eta, int use_clipped) {
  FdDdimCoefs<C> k;
  k.sqrt_abar = C(row[FD_SQRT_ABAR]);
  k.sqrt_1m_abar = C(row[FD_SQRT_1M_ABAR]);
  k.sqrt_abar_prev = C(row[FD_DDIM_SQRT_ABAR_PREV]);
  k.std = C(eta) * C(row[FD_DDIM_SIGMA]);
  C var = C(row[FD_DDIM_1M_ABAR_PREV]) - k.std * k.std;
  k.direction = fd_sqrt(var < C(0) ? C(0) : var);
  k.clip_range = C(clip_range);
  k.pred = pred;
  k.clip_mode = clip_mode;
  k.use_clipped = use_clipped;
  return k;
}

// DDIM eq. 12: prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise.
template <typename C>
FD_HOST_DEVICE inline void fd_ddim_update(const FdDdimCoefs<C>& k, C m, C x, C noise, C s, C& prev, C& x0) {
  x0 = fd_predict_x0(k.pred, m, x, k.sqrt_abar, k.sqrt_1m_abar);
  C eps = fd_predict_eps(k.pred, m, x, k.sqrt_abar, k.sqrt_1m_abar);
  x0 = fd_clip_x0(k.clip_mode, x0, k.clip_range, s);
  if (k.use_clipped) eps = (x - k.sqrt_abar * x0) / k.sqrt_1m_abar;  // eps re-derived from the clipped x0
  prev = k.sqrt_abar_prev * x0 + k.direction * eps + k.std * noise;
}

// Forward noising, DDPM eq. 4: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and the v target
// (Salimans & Ho 2022 sec. 4): v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0.
template <typename C>
FD_HOST_DEVICE inline C fd_q_sample(C a, C b, C x0, C noise) {
  return a * x0 + b * noise;
}
template <typename C>
FD_HOST_DEVICE inline C fd_v_target(C a, C b, C x0, C noise) {
  return a * noise - b * x0;
}
