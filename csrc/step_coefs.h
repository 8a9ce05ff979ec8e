// Column layout of a coefficient row (one row of a fastdiff.tables table, float32 [FD_WIDTH]).
// Must equal fastdiff/tables.py; tests/test_cpp_ops.py parses this header and checks it.
#pragma once

#define FD_WIDTH 8

// Columns common to every step table.
#define FD_TIMESTEP 0     // t as a float: the Philox step counter of this step's noise
#define FD_SQRT_ABAR 1    // sqrt(abar_t)
#define FD_SQRT_1M_ABAR 2 // sqrt(1 - abar_t)

// DDPM (Ho et al. 2020, eq. 6-7).
#define FD_DDPM_C_X0 3    // posterior mean coefficient of x0
#define FD_DDPM_C_XT 4    // posterior mean coefficient of x_t
#define FD_DDPM_STD 5     // noise std (fixed types) or a 0/1 gate (learned types)
#define FD_DDPM_MIN_LOG 6 // log of the clamped posterior variance (IDDPM eq. 15 lower end)
#define FD_DDPM_MAX_LOG 7 // log beta_t (IDDPM eq. 15 upper end)

// DDIM (Song et al. 2021, eq. 12 and 16).
#define FD_DDIM_SQRT_ABAR_PREV 3 // sqrt(abar_prev)
#define FD_DDIM_1M_ABAR_PREV 4   // 1 - abar_prev
#define FD_DDIM_SIGMA 5          // sigma_t at eta = 1 (DDIM eq. 16)

// Variance modes (tables.variance_mode) and prediction codes (tables.prediction_code).
#define FD_VAR_FIXED 0
#define FD_VAR_LEARNED 1
#define FD_VAR_LEARNED_RANGE 2
#define FD_PRED_EPSILON 0
#define FD_PRED_SAMPLE 1
#define FD_PRED_V 2

// Noise streams (fastdiff/noise.py).
#define FD_STREAM_STEP 0
#define FD_STREAM_Q_SAMPLE 1
