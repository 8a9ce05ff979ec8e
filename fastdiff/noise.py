"""The counter-based Philox normal stream shared by every backend.

Each normal is a pure function of (seed, counter, stream, global sample index, element index).
Element e of a sample takes normal e % 4 of the Philox block at quad q = e // 4:

    key              = (seed & 0xFFFFFFFF, seed >> 32)             # 64-bit seed
    i0, i1, i2, i3   = Philox4x32-10((q, global sample index, step counter, stream), key)
    n0, n1           = Box-Muller(uniform(i0), uniform(i1))       # (r cos th, r sin th)
    n2, n3           = Box-Muller(uniform(i2), uniform(i3))

This is Triton's `tl.randn4x` (triton/language/random.py: the same round function, uint->uniform
conversion and Box-Muller) with our counter words, so one Philox evaluation and two logs serve
four elements; csrc/ implements the same integer stream bit for bit.
Because the counter holds the *global* sample index, sample i gets the same noise in a batch of
1, a batch of 64, or a slice of a batch on another process (`sample_offset`).

The step counter of a reverse step is its row's NOISE_COUNTER (fastdiff.tables): the timestep for
DDPM / DDIM (whose rows are keyed by timestep), the step index for every other sampler; the stream
separates the reverse-step noise from the training (q-sample) noise for the same seed.
"""
from __future__ import annotations

from typing import Sequence

import torch

STREAM_STEP = 0  # noise injected by a reverse step; counter = the row's NOISE_COUNTER
STREAM_Q_SAMPLE = 1  # training noise of q_sample
STREAM_INITIAL_NOISE = 2  # x_T drawn by fastdiff.sample(seed=...)
STREAM_TRAINING_TIMESTEPS = 3  # per-sample training timesteps drawn by diffusion_loss(seed=...)

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
UINT_TO_UNIFORM_SCALE = 4.6566127342e-10  # Triton's: max int32 * scale < 1.0 in float32
MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a 32-bit constant a and int64 b in [0, 2^32).

    int64 cannot hold the 64-bit product, so b is split in 16-bit halves (each partial < 2^48).
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32(counters: Sequence[torch.Tensor], seed, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 (Salmon et al. 2011) on int64 tensors holding uint32 values; `seed` an int or an int64 tensor."""
    c0, c1, c2, c3 = (c.to(torch.int64) & MASK32 for c in counters)
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(())  # a device seed broadcasts over the counters
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: bitcast to int32, fold negatives with ~x, scale."""
    x = torch.where(x >= 2**31, x - 2**32, x)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(UINT_TO_UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's pair_uniform_to_normal in float32: (r cos th, r sin th)."""
    u1 = torch.clamp(u1, min=1.0e-7)
    theta = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(theta), r * torch.sin(theta)


def check_seed(seed):
    """An int seed in [0, 2**63), or a device seed (an int64 tensor of one element, read by the kernels at
    run time, so a captured CUDA graph serves every seed; its value is not checked: no sync)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"a seed tensor must be int64 with one element, got {seed.dtype} of shape "
                             f"{tuple(seed.shape)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63) or an int64 tensor, got {seed!r}")
    return seed


_SEED_TENSORS: dict = {}  # (seed, device) -> its int64 [1] tensor (a few; ints repeat across steps)


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The Philox key as the step kernels read it: an int64 [1] tensor on `device` (an int seed is made
    one, cached; a tensor must already be there). Called for every seeded step: kept cheap."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            check_seed(seed)  # raises, naming what is wrong
        if seed.device != device and not (seed.is_cpu and torch.device(device).type == "cpu"):
            raise ValueError(f"the seed tensor is on {seed.device} but the sample is on {device}")
        return seed if seed.dim() == 1 else seed.reshape(1)
    key = (seed, device)
    tensor = _SEED_TENSORS.get(key)
    if tensor is None or torch.compiler.is_compiling():
        check_seed(seed)
        tensor = torch.full((1,), seed, dtype=torch.int64, device=device)
        if torch.compiler.is_compiling():
            return tensor  # traced: a constant, no cache (a cache read would add guards)
        if len(_SEED_TENSORS) >= 64:
            _SEED_TENSORS.clear()
        _SEED_TENSORS[key] = tensor
    return tensor


def randn(
    shape: Sequence[int],
    seed: int | torch.Tensor,
    *,
    counter: int = 0,
    stream: int = STREAM_STEP,
    sample_offset: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Normals of the fastdiff stream, exactly as the fused kernels draw them.

    `shape[0]` is the batch; sample i of the result is global sample `sample_offset + i`.
    `randn(x.shape, seed, counter=t)` is the noise a seeded DDPM step at timestep t adds to x.
    Runs on any device (plain tensor ops; the fused kernels are the fast path).
    """
    check_seed(seed)
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("shape must have a batch dimension, got ()")
    batch, per_sample = shape[0], 1
    for s in shape[1:]:
        per_sample *= s
    quads = (per_sample + 3) // 4
    quad = torch.arange(quads, device=device, dtype=torch.int64).expand(batch, quads)
    sample = (torch.arange(batch, device=device, dtype=torch.int64) + sample_offset)[:, None].expand(batch, quads)
    zeros = torch.zeros((), device=device, dtype=torch.int64)
    words = [uint32_to_uniform(w) for w in philox4x32((quad, sample, zeros + counter, zeros + stream), seed)]
    normals = torch.stack([*box_muller(words[0], words[1]), *box_muller(words[2], words[3])], dim=-1)
    return normals.reshape(batch, 4 * quads)[:, :per_sample].reshape(shape).to(dtype)


def randint(batch: int, high: int, seed: int, *, counter: int = 0, stream: int = STREAM_TRAINING_TIMESTEPS,
            sample_offset: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """[batch] int64 in [0, high) on `device`, one per global sample index: floor(w * high / 2^32) of the
    first Philox word w of quad 0 of each sample. The same integers on every device (exact integer math),
    drawn where they are used (no host copy)."""
    check_seed(seed)
    if not 0 < high <= 2**31:
        raise ValueError(f"high must be in (0, 2**31], got {high!r}")
    sample = torch.arange(batch, device=device, dtype=torch.int64) + sample_offset
    zeros = torch.zeros((), device=device, dtype=torch.int64)
    word = philox4x32((zeros.expand(batch), sample, zeros + counter, zeros + stream), seed)[0]
    return (word * high) >> 32


_SEED_DRAW = torch.empty((), dtype=torch.int64)  # reused: an in-place draw costs half of torch.randint's


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh 62-bit seed from a CPU generator (torch's default one when None): no device sync."""
    return int(_SEED_DRAW.random_(0, 2**62, generator=generator))
