"""Step tables: a step is a row of numbers (DESIGN "The step engine").

Every sampler computes, per element, the same few lines (fastdiff.reference.step is the ground
truth; fastdiff/kernels/step.py, csrc/step_math.h and fastdiff/eager.py implement them):

    m    = u + w (c - u) + w2 (c - e)          guidance (CFG, Ho & Salimans 2022 eq. 6; SD3 skip-layer)
    x    = sample + PRE_NOISE n                 noise added before the update (Euler's churn)
    x0   = clip((X0_X x + X0_M m) X0_SCALE)     the prediction type as numbers; clipping or thresholding
    out  = OUT_X x + OUT_M m + OUT_X0 x0 + sum_k OUT_H[k] h_k + std n          -> prev_sample
    out2 = OUT2_X x + OUT2_M m + OUT2_X0 x0 + sum_k OUT2_H[k] h_k             -> history[OUT2_SLOT]
    hist = HIST_X x + HIST_M m + HIST_X0 x0                                   -> history[HIST_SLOT]

with h_k = history[READ_SLOT[k]] and std = NOISE_STD (fixed variance) or NOISE_STD times a
per-element factor from the model's variance channels v: sqrt(max(v, 0)) ("sqrt" mode, diffusers'
`learned`) or exp(VAR_BIAS + VAR_SLOPE v) ("exp" mode: IDDPM's `learned_range`, a log-variance).

A sampler is a table builder: `set_timesteps` computes one float32 row per step (or per timestep
for DDPM / DDIM, which diffusers keys by the timestep value) plus a last all-NaN sentinel row;
a step reads the row its device index points at, and an index outside the table reads the
sentinel, so a bad device-side index gives NaN, never a silent wrong sample. The history is a
[slots, *sample.shape] buffer of the sampler's; rows name the slots they read and write (a row
never writes a slot it reads), so the order in force at each step is data, not control flow.
"""
from __future__ import annotations

import math

import torch

# ---- the step row ------------------------------------------------------------------------------
NOISE_COUNTER = 0  # Philox step counter of this row's noise (an integer, exact below 2**24)
X0_X, X0_M, X0_SCALE = 1, 2, 3  # x0 = (X0_X x + X0_M m) X0_SCALE, before clipping
PRE_NOISE = 4  # x = sample + PRE_NOISE n
OUT_X, OUT_M, OUT_X0 = 5, 6, 7
OUT_H = (8, 9, 10, 11)
NOISE_STD = 12
OUT2_X, OUT2_M, OUT2_X0 = 13, 14, 15
OUT2_H = (16, 17, 18, 19)
HIST_X, HIST_M, HIST_X0 = 20, 21, 22
READ_SLOT = (23, 24, 25, 26)  # history slots read as h_1 .. h_4
HIST_SLOT = 27  # slot `hist` is written to
OUT2_SLOT = 28  # slot `out2` is written to
VAR_BIAS, VAR_SLOPE = 29, 30  # "exp" variance mode: std = NOISE_STD exp(VAR_BIAS + VAR_SLOPE v)
INPUT_DIVISOR = 31  # scale_model_input: sample / INPUT_DIVISOR (Euler: sqrt(sigma^2 + 1))
WIDTH = 32
MAX_HISTORY_READS = len(READ_SLOT)

COLUMNS = {
    "noise_counter": NOISE_COUNTER, "x0_x": X0_X, "x0_m": X0_M, "x0_scale": X0_SCALE, "pre_noise": PRE_NOISE,
    "out_x": OUT_X, "out_m": OUT_M, "out_x0": OUT_X0, "noise_std": NOISE_STD,
    "out2_x": OUT2_X, "out2_m": OUT2_M, "out2_x0": OUT2_X0, "hist_x": HIST_X, "hist_m": HIST_M, "hist_x0": HIST_X0,
    "hist_slot": HIST_SLOT, "out2_slot": OUT2_SLOT, "var_bias": VAR_BIAS, "var_slope": VAR_SLOPE,
    "input_divisor": INPUT_DIVISOR,
    **{f"out_h{k + 1}": c for k, c in enumerate(OUT_H)},
    **{f"out2_h{k + 1}": c for k, c in enumerate(OUT2_H)},
    **{f"read_slot{k + 1}": c for k, c in enumerate(READ_SLOT)},
}
DEFAULTS = {"x0_scale": 1.0, "input_divisor": 1.0}  # every other column defaults to 0

# How the noise std of a step is formed (the `variance` argument of the step op).
VAR_FIXED, VAR_SQRT, VAR_EXP = 0, 1, 2
VARIANCE_MODES = {"fixed": VAR_FIXED, "sqrt": VAR_SQRT, "exp": VAR_EXP}

# ---- the q-sample row (training noising, DDPM eq. 4, and its regression target) ------------------
# x_t = Q_A x0 + Q_B n;  target = Q_P x0 + Q_Q n
Q_A, Q_B, Q_P, Q_Q = 0, 1, 2, 3
Q_WIDTH = 4


def step_table(num_rows: int, *, dtype: torch.dtype = torch.float64, **columns) -> torch.Tensor:
    """A float32 step table [num_rows + 1, WIDTH] from named columns; the last row is all NaN.

    Each keyword is a column name of COLUMNS, given as a number or a [num_rows] tensor (computed
    in `dtype`, float64 or float32, then rounded once to float32). Columns not given are 0
    (X0_SCALE and INPUT_DIVISOR: 1); NOISE_COUNTER defaults to the row index.
    """
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise ValueError(f"unknown step-table columns {unknown}; known: {sorted(COLUMNS)}")
    table = torch.zeros(num_rows + 1, WIDTH, dtype=dtype)
    table[:, NOISE_COUNTER] = torch.arange(num_rows + 1, dtype=dtype)
    for name, default in DEFAULTS.items():
        table[:, COLUMNS[name]] = default
    for name, value in columns.items():
        value = torch.as_tensor(value, dtype=dtype)
        if value.ndim not in (0, 1) or (value.ndim == 1 and value.shape[0] != num_rows):
            raise ValueError(f"column {name} must be a number or have {num_rows} entries, got shape {tuple(value.shape)}")
        table[:num_rows, COLUMNS[name]] = value
    table[num_rows] = math.nan
    check_history_slots(table[:num_rows])
    return table.to(torch.float32)


def check_history_slots(rows: torch.Tensor) -> None:
    """A row never writes a history slot it reads (kernels read and write one slot buffer in one pass)."""
    reads = rows[:, list(READ_SLOT)]
    for slot, written, read_by in ((HIST_SLOT, [HIST_X, HIST_M, HIST_X0], OUT_H + OUT2_H),
                                   (OUT2_SLOT, [OUT2_X, OUT2_M, OUT2_X0, *OUT2_H], OUT_H + OUT2_H)):
        writes = rows[:, written].ne(0).any(1, keepdim=True)
        read_used = (rows[:, list(read_by[:4])].ne(0) | rows[:, list(read_by[4:])].ne(0))
        clash = writes & read_used & reads.eq(rows[:, slot:slot + 1])
        if clash.any():
            step = int(clash.any(1).nonzero()[0])
            raise ValueError(f"step table row {step} writes history slot {int(rows[step, slot])} that it also reads")
    writes_both = rows[:, [HIST_X, HIST_M, HIST_X0]].ne(0).any(1) & rows[:, [OUT2_X, OUT2_M, OUT2_X0, *OUT2_H]].ne(0).any(1)
    same = writes_both & rows[:, HIST_SLOT].eq(rows[:, OUT2_SLOT])
    if same.any():
        step = int(same.nonzero()[0])
        raise ValueError(f"step table row {step} writes hist and out2 into the same history slot {int(rows[step, HIST_SLOT])}")


def q_sample_table(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """float32 [len(a) + 1, Q_WIDTH] rows (x_t = a x0 + b n, target = p x0 + q n) and a NaN sentinel row."""
    rows = torch.stack([torch.as_tensor(v, dtype=torch.float64).expand(len(a)) for v in (a, b, p, q)], dim=1)
    return torch.cat([rows, torch.full((1, Q_WIDTH), math.nan, dtype=rows.dtype)]).to(torch.float32)


def row_index(index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The row a kernel reads for `index`: itself inside [0, num_rows - 1), else the NaN sentinel."""
    index = index.to(torch.int64)
    return torch.where((index >= 0) & (index < num_rows - 1), index, torch.full_like(index, num_rows - 1))


def gather_row(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The row of a [1] device index, by a gather (never `table[0-d tensor]`, which calls .item())."""
    return table.index_select(0, row_index(index.reshape(1), table.shape[0]))[0]
