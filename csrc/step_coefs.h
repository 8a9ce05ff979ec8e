// Column layout of a step row (one row of a fastdiff.tables step table, float32 [FD_WIDTH]) and of a
// q-sample row, the variance modes and the noise streams. Must equal fastdiff/tables.py and
// fastdiff/noise.py; tests/test_cpp_ops.py parses this header and checks every value.
#pragma once

#define FD_WIDTH 32
#define FD_MAX_HISTORY_READS 4

#define FD_NOISE_COUNTER 0  // Philox step counter of the row's noise
#define FD_X0_X 1           // x0 = clip((X0_X x + X0_M m) X0_SCALE)
#define FD_X0_M 2
#define FD_X0_SCALE 3
#define FD_PRE_NOISE 4      // x = sample + PRE_NOISE n
#define FD_OUT_X 5          // out = OUT_X x + OUT_M m + OUT_X0 x0 + sum_k OUT_H[k] h_k + std n
#define FD_OUT_M 6
#define FD_OUT_X0 7
#define FD_OUT_H1 8
#define FD_OUT_H2 9
#define FD_OUT_H3 10
#define FD_OUT_H4 11
#define FD_NOISE_STD 12
#define FD_OUT2_X 13        // out2 = OUT2_X x + OUT2_M m + OUT2_X0 x0 + sum_k OUT2_H[k] h_k -> history[OUT2_SLOT]
#define FD_OUT2_M 14
#define FD_OUT2_X0 15
#define FD_OUT2_H1 16
#define FD_OUT2_H2 17
#define FD_OUT2_H3 18
#define FD_OUT2_H4 19
#define FD_HIST_X 20        // hist = HIST_X x + HIST_M m + HIST_X0 x0 -> history[HIST_SLOT]
#define FD_HIST_M 21
#define FD_HIST_X0 22
#define FD_READ_SLOT1 23    // history slots read as h_1 .. h_4
#define FD_READ_SLOT2 24
#define FD_READ_SLOT3 25
#define FD_READ_SLOT4 26
#define FD_HIST_SLOT 27
#define FD_OUT2_SLOT 28
#define FD_VAR_BIAS 29      // "exp" variance: std = NOISE_STD exp(VAR_BIAS + VAR_SLOPE v)
#define FD_VAR_SLOPE 30
#define FD_INPUT_DIVISOR 31 // scale_model_input (not read by the step)

// q-sample row: x_t = Q_A x0 + Q_B n, target = Q_P x0 + Q_Q n.
#define FD_Q_A 0
#define FD_Q_B 1
#define FD_Q_P 2
#define FD_Q_Q 3
#define FD_Q_WIDTH 4

// Variance modes (fastdiff.tables.VARIANCE_MODES): how a step's noise std is formed.
#define FD_VAR_FIXED 0
#define FD_VAR_SQRT 1
#define FD_VAR_EXP 2

// Noise streams (fastdiff/noise.py).
#define FD_STREAM_STEP 0
#define FD_STREAM_Q_SAMPLE 1
