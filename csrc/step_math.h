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

// x0 and eps are linear in (x, m) for every prediction type, so a call turns the prediction type
// into a few numbers and the per-element code is branch-free FMAs (the CPU loops vectorise; GPU
// threads run the same instructions). Each is (a x + b m) * scale, keeping the reference's order
// of operations (the difference x - sqrt(1 - abar) m is formed first: it can cancel):
//   epsilon: x0 = (x - sqrt(1 - abar) m) / sqrt(abar)  (DDPM eq. 15),  eps = m
//   sample:  x0 = m,                                    eps = (x - sqrt(abar) m) / sqrt(1 - abar)
//   v:       x0 = sqrt(abar) x - sqrt(1 - abar) m,      eps = sqrt(1 - abar) x + sqrt(abar) m
//            (Salimans & Ho 2022, sec. 4)
template <typename C>
struct FdLinear {
  C x, m, scale;
};

template <typename C>
struct FdPrediction {
  FdLinear<C> x0, eps;
};

template <typename C>
FD_HOST_DEVICE inline FdPrediction<C> fd_prediction(int pred, C sqrt_abar, C sqrt_1m_abar) {
  if (pred == FD_PRED_EPSILON) return {{C(1), -sqrt_1m_abar, C(1) / sqrt_abar}, {C(0), C(1), C(1)}};
  if (pred == FD_PRED_SAMPLE) return {{C(0), C(1), C(1)}, {C(1), -sqrt_abar, C(1) / sqrt_1m_abar}};
  return {{sqrt_abar, -sqrt_1m_abar, C(1)}, {sqrt_1m_abar, sqrt_abar, C(1)}};
}

template <typename C>
FD_HOST_DEVICE inline C fd_linear(const FdLinear<C>& f, C x, C m) {
  return (f.x * x + f.m * m) * f.scale;
}

// Clipping of x0 as one NaN-propagating clamp to [-hi, hi] and a scale: none (hi = inf),
// clip_sample (hi = range), dynamic thresholding (Imagen sec. 2.3: hi = s, scale = 1 / s, with s
// the per-sample threshold). Thresholding takes precedence (validate.cpp picks the mode).
#define FD_CLIP_NONE 0
#define FD_CLIP_RANGE 1
#define FD_CLIP_THRESHOLD 2

template <typename C>
struct FdClip {
  C hi, scale;
};

template <typename C>
FD_HOST_DEVICE inline FdClip<C> fd_clip(int mode, C clip_range, C s) {
  if (mode == FD_CLIP_THRESHOLD) return {s, C(1) / s};
  if (mode == FD_CLIP_RANGE) return {clip_range, C(1)};
  return {C(INFINITY), C(1)};
}

template <typename C>
FD_HOST_DEVICE inline C fd_x0(const FdPrediction<C>& p, const FdClip<C>& clip, C m, C x) {
  return fd_clamp(fd_linear(p.x0, x, m), -clip.hi, clip.hi) * clip.scale;
}

// Scalars of one DDPM step, read from the coefficient row (host or device) and the call.
template <typename C>
struct FdDdpmCoefs {
  FdPrediction<C> pred;
  C c_x0, c_xt, std, min_log, max_log, clip_range;
  int clip_mode;
};

template <typename C>
FD_HOST_DEVICE inline FdDdpmCoefs<C> fd_ddpm_coefs(const float* row, int pred, int clip_mode, double clip_range) {
  FdDdpmCoefs<C> k;
  k.pred = fd_prediction(pred, C(row[FD_SQRT_ABAR]), C(row[FD_SQRT_1M_ABAR]));
  k.c_x0 = C(row[FD_DDPM_C_X0]);
  k.c_xt = C(row[FD_DDPM_C_XT]);
  k.std = C(row[FD_DDPM_STD]);
  k.min_log = C(row[FD_DDPM_MIN_LOG]);
  k.max_log = C(row[FD_DDPM_MAX_LOG]);
  k.clip_range = C(clip_range);
  k.clip_mode = clip_mode;
  return k;
}

// Per-element noise std (VAR is the variance mode, a compile-time choice). fixed: the row's std.
// learned: std = sqrt(max(v, 0)) (our NaN policy). learned_range: IDDPM eq. 15,
// log var = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2.
template <int VAR, typename C>
FD_HOST_DEVICE inline C fd_ddpm_std(const FdDdpmCoefs<C>& k, C v) {
  if constexpr (VAR == FD_VAR_LEARNED) {
    return k.std * fd_sqrt(v < C(0) ? C(0) : v);
  } else if constexpr (VAR == FD_VAR_LEARNED_RANGE) {
    C frac = (v + C(1)) / C(2);
    C log_variance = frac * k.max_log + (C(1) - frac) * k.min_log;
    return k.std * fd_exp(C(0.5) * log_variance);
  } else {
    return k.std;
  }
}

// DDPM reverse step (DDPM eq. 6-7, Algorithm 2): x0, then the posterior mean plus std * noise.
template <int VAR, typename C>
FD_HOST_DEVICE inline void fd_ddpm_update(const FdDdpmCoefs<C>& k, const FdClip<C>& clip, C m, C v, C x, C noise,
                                          C& prev, C& x0) {
  x0 = fd_x0(k.pred, clip, m, x);
  C mean = k.c_x0 * x0 + k.c_xt * x;  // posterior mean, DDPM eq. 7
  prev = mean + fd_ddpm_std<VAR>(k, v) * noise;
}

// Scalars of one DDIM step. std = eta sigma_t (DDIM eq. 16); the direction coefficient
// sqrt(1 - abar_prev - std^2) is clamped at 0 (eta > 1, our NaN policy). use_clipped_model_output
// re-derives eps from the clipped x0, eps = (x - sqrt(abar) x0) / sqrt(1 - abar): the same linear
// form with x0 in place of m.
template <typename C>
struct FdDdimCoefs {
  FdPrediction<C> pred;
  C sqrt_abar_prev, direction, std, clip_range;
  int clip_mode, use_clipped;
};

template <typename C>
FD_HOST_DEVICE inline FdDdimCoefs<C> fd_ddim_coefs(const float* row, int pred, int clip_mode, double clip_range,
                                                   double eta, int use_clipped) {
  FdDdimCoefs<C> k;
  const C sqrt_abar = C(row[FD_SQRT_ABAR]), sqrt_1m_abar = C(row[FD_SQRT_1M_ABAR]);
  k.pred = fd_prediction(pred, sqrt_abar, sqrt_1m_abar);
  k.use_clipped = use_clipped;
  if (use_clipped) k.pred.eps = {C(1), -sqrt_abar, C(1) / sqrt_1m_abar};
  k.sqrt_abar_prev = C(row[FD_DDIM_SQRT_ABAR_PREV]);
  k.std = C(eta) * C(row[FD_DDIM_SIGMA]);
  C var = C(row[FD_DDIM_1M_ABAR_PREV]) - k.std * k.std;
  k.direction = fd_sqrt(var < C(0) ? C(0) : var);
  k.clip_range = C(clip_range);
  k.clip_mode = clip_mode;
  return k;
}

// DDIM eq. 12: prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise.
template <typename C>
FD_HOST_DEVICE inline void fd_ddim_update(const FdDdimCoefs<C>& k, const FdClip<C>& clip, C m, C x, C noise,
                                          C& prev, C& x0) {
  x0 = fd_x0(k.pred, clip, m, x);
  C eps = fd_linear(k.pred.eps, x, k.use_clipped ? x0 : m);  // a select, not a branch
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
