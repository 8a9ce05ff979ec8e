"""The Philox normal stream: bit-exact with the numpy oracle, independent of batch split.

How streams are compared (DESIGN "Noise"): the integer stream (Philox words) bit for bit on every
backend and device; the normals within a few float32 ulp, never with an absolute tolerance:
log / sin / cos differ between libm, SLEEF, libdevice and numpy, Triton's Box-Muller takes an
approximate sqrt on sm_90, and nvcc contracts multiply-adds into FMAs, each a few ulp. An atol of
1e-6 is both too tight (3 ulp of a normal near 5 are 1.4e-6) and too loose (1e-6 is thousands of
ulp of a normal near 1e-3). See `ulp_distance` / `assert_ulp_close` (other tests import them).
"""
import os

import numpy as np
import pytest
import torch

import philox_oracle as oracle
from fastdiff import noise

MAX_ULP = 4  # the few float32 ulp every backend's normals stay within (measured: CPU torch vs numpy <= 3)


# ---- float32 ulp distance -----------------------------------------------------------------------------
def _ordered(x: np.ndarray) -> np.ndarray:
    """float32 bit patterns mapped to integers that order like the floats (-0.0 and 0.0 both 0)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def ulp_distance(a, b, floor: float = 0.0) -> np.ndarray:
    """Distance between float32 values in units in the last place.

    floor = 0: the count of float32 values between a and b (exact, any sign; NaN -> inf).
    floor > 0: |a - b| in ulps of max(|b|, floor): values below `floor` are measured in ulps of
    `floor`, because Box-Muller's r cos(th) has an absolute, not relative, error near the zeros of
    cos (th itself is rounded): there a 1e-9 difference must not count as a million ulp.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float32)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float32)
    if floor > 0:
        scale = np.spacing(np.maximum(np.abs(b), np.float32(floor)).astype(np.float32))
        dist = np.abs(a.astype(np.float64) - b.astype(np.float64)) / scale.astype(np.float64)
    else:
        dist = np.abs(_ordered(a) - _ordered(b)).astype(np.float64)
    return np.where(np.isnan(a) | np.isnan(b), np.inf, dist)


def assert_ulp_close(actual, expected, max_ulp: float = MAX_ULP, floor: float = 1.0, what: str = "") -> None:
    """Every element of `actual` within `max_ulp` float32 ulp of `expected` (see ulp_distance)."""
    dist = ulp_distance(actual, expected, floor)
    if dist.size and dist.max() > max_ulp:
        worst = np.unravel_index(np.argmax(dist), dist.shape)
        a, e = np.asarray(actual.cpu() if isinstance(actual, torch.Tensor) else actual), np.asarray(
            expected.cpu() if isinstance(expected, torch.Tensor) else expected)
        raise AssertionError(f"{what}: {int((dist > max_ulp).sum())} of {dist.size} elements more than {max_ulp} ulp "
                             f"apart; worst {dist.max():.1f} ulp at {tuple(int(i) for i in worst)}: "
                             f"{float(a[worst])!r} vs {float(e[worst])!r}")


def test_ulp_distance_known_values():
    one = np.float32(1.0)
    assert ulp_distance(one, one) == 0
    assert ulp_distance(one, np.nextafter(one, np.float32(2))) == 1
    assert ulp_distance(np.float32(2.0), np.nextafter(np.float32(2.0), np.float32(0))) == 1  # across a binade
    assert ulp_distance(one, one + np.float32(2**-22)) == 2
    assert ulp_distance(np.float32(-0.0), np.float32(0.0)) == 0
    tiny = np.float32(1e-45)  # the smallest subnormal
    assert ulp_distance(tiny, -tiny) == 2
    assert ulp_distance(np.float32(np.nan), one) == np.inf
    # floored: below the floor a difference counts in ulps of the floor
    assert ulp_distance(np.float32(1e-8), np.float32(2e-8), floor=1.0) == pytest.approx(1e-8 / 2**-23)
    assert ulp_distance(np.float32(4.0), np.float32(4.0) + np.float32(2**-21), floor=1.0) == 1


def test_gpu_like_rounding_passes_ulps_where_an_atol_of_1e_6_fails():
    """Box-Muller with the sqrt off by 2 ulp (sm_90's approximate sqrt) stays within MAX_ULP ulp, but
    near |n| = 5 it is more than 1e-6 away: the old atol=1e-6 GPU check would have failed."""
    u1 = np.array([1e-7, 2e-7, 0.25, 0.7], dtype=np.float32)
    th = np.float32(6.283185307179586) * np.array([0.0, 0.5, 0.1, 0.3], dtype=np.float32)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    exact = (r * np.cos(th)).astype(np.float32)
    r_gpu = (r * np.float32(1 + 2**-22)).astype(np.float32)  # 2 ulp up
    gpu = (r_gpu * np.cos(th)).astype(np.float32)
    assert_ulp_close(gpu, exact, what="emulated sm_90 stream")
    assert np.abs(gpu - exact).max() > 1e-6  # what np.testing.assert_allclose(atol=1e-6) rejected
    small = np.float32(1e-3)  # and the converse: atol=1e-6 accepts a normal 5e-7 off near 1e-3,
    assert ulp_distance(small + np.float32(5e-7), small, floor=0.0) > 1000  # thousands of ulp


def _interleaved_words(shape, seed, counter, stream, sample_offset, device):
    """fastdiff.noise's integer stream laid out as tests/philox_oracle.randn's (word, partner) per element."""
    batch, per_sample = shape
    quads = (per_sample + 3) // 4
    quad = torch.arange(quads, device=device).expand(batch, quads)
    sample = (torch.arange(batch, device=device) + sample_offset)[:, None].expand(batch, quads)
    zeros = torch.zeros((), dtype=torch.int64, device=device)
    i0, i1, i2, i3 = noise.philox4x32((quad, sample, zeros + counter, zeros + stream), seed)

    def inter(a, b, c, d):
        return torch.stack([a, b, c, d], -1).reshape(batch, 4 * quads)[:, :per_sample]
    return inter(i0, i0, i2, i2), inter(i1, i1, i3, i3)


def draw_stream(source: str, device: str, shape, seed, counter, stream, sample_offset):
    """(words, partners, normals) of one backend's stream on `device`, or pytest.skip with the reason."""
    if source == "torch":
        words, partners = _interleaved_words(shape, seed, counter, stream, sample_offset, device)
        normals = noise.randn(shape, seed, counter=counter, stream=stream, sample_offset=sample_offset, device=device)
        return words, partners, normals
    if source == "triton":
        from fastdiff import backends
        reason = backends.unavailable_reason("triton", device)
        if reason is not None and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            reason = None
        if reason:
            pytest.skip(f"triton: {reason}")
        try:
            common = backends._import_kernels()._common
        except Exception as error:  # noqa: BLE001 - a kernels package mid-rewrite is a reason, not a crash
            pytest.skip(f"the Triton kernels failed to import: {type(error).__name__}: {error}")
        words, partners, normals = common.philox_debug(shape[0], shape[1], seed, counter, stream,
                                                       sample_offset=sample_offset, device=device)
        return words, partners, normals
    from fastdiff import _cpp
    reason = _cpp.unavailable_reason(device)
    if reason:
        if device == "cuda" and os.environ.get("FASTDIFF_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"FASTDIFF_REQUIRE_CUDA_EXT=1 but the C++ CUDA backend is unavailable: {reason}")
        pytest.skip(f"cpp: {reason}")
    normals, bits = _cpp.philox_randn(torch.empty(shape, device=device), seed, counter, stream, sample_offset)
    return bits[0], bits[1], normals


SOURCES = [pytest.param(s, "cpu", id=f"{s}-cpu") for s in ("torch", "triton", "cpp")] + [
    pytest.param(s, "cuda", id=f"{s}-gpu", marks=pytest.mark.cuda) for s in ("torch", "triton", "cpp")]


@pytest.mark.parametrize("source,device", SOURCES)
@pytest.mark.parametrize("per_sample", [4099, 3])
def test_every_stream_is_the_oracle(source, device, per_sample):
    """Integers bit for bit; normals within MAX_ULP ulp (Triton on the CPU runs in its interpreter)."""
    shape, seed, counter, offset = (3, per_sample), 2**40 + 3, 17, 5
    words, partners, normals = draw_stream(source, device, shape, seed, counter, noise.STREAM_STEP, offset)
    want, (want_words, want_partners) = oracle.randn(shape, seed, counter, noise.STREAM_STEP, sample_offset=offset)
    as_u32 = lambda t: (t.cpu().numpy().astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)  # noqa: E731
    assert np.array_equal(as_u32(words), want_words), f"{source} on {device}: Philox words differ"
    assert np.array_equal(as_u32(partners), want_partners), f"{source} on {device}: partner words differ"
    assert_ulp_close(normals, want, what=f"{source} normals on {device}")


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**40 + 12345, 2**63 - 1])
def test_integer_stream_bit_exact(seed):
    element = torch.arange(4096) * 7919
    sample = torch.arange(4096) % 13
    got = noise.philox4x32((element, sample, torch.tensor(999), torch.tensor(1)), seed)
    want = oracle.philox(element.numpy(), sample.numpy(), 999, 1, seed)
    for g, w in zip(got, want):
        assert np.array_equal(g.numpy().astype(np.uint32), w)


def test_philox_known_answer():
    # Random123's published known-answer vector for philox4x32-10 (kat_vectors): counter and key
    # all 0xFFFFFFFF (the key as the 64-bit seed here).
    got = noise.philox4x32([torch.tensor(0xFFFFFFFF)] * 4, 0xFFFFFFFF_FFFFFFFF % 2**64)
    assert [int(x) for x in got] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_normals_match_oracle():
    got = noise.randn((3, 5, 7, 11), 1234, counter=17, sample_offset=9)
    want, _ = oracle.randn((3, 5, 7, 11), 1234, counter=17, sample_offset=9)
    assert_ulp_close(got, want, what="torch CPU normals")


def test_sample_noise_does_not_depend_on_batch():
    big = noise.randn((64, 3, 4, 4), 7, counter=3)
    for i in (0, 5, 63):
        alone = noise.randn((1, 3, 4, 4), 7, counter=3, sample_offset=i)
        assert torch.equal(alone[0], big[i])


def test_counter_and_stream_change_the_noise():
    base = noise.randn((2, 100), 7, counter=3)
    assert not torch.equal(base, noise.randn((2, 100), 7, counter=4))
    assert not torch.equal(base, noise.randn((2, 100), 7, counter=3, stream=noise.STREAM_Q_SAMPLE))
    assert not torch.equal(base, noise.randn((2, 100), 8, counter=3))


def test_statistics():
    x = noise.randn((16, 4096), 99).double()
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    assert abs((x**3).mean().item()) < 0.03 and abs((x**4).mean().item() - 3) < 0.06


def test_bad_seed():
    with pytest.raises(ValueError, match="seed must be an int"):
        noise.randn((1, 2), -1)


def test_element_noise_does_not_depend_on_sample_size():
    """Element e always takes normal e % 4 of Philox quad e // 4, whatever the sample's length."""
    long = noise.randn((2, 12), 5, counter=1)
    for n in (1, 5, 7, 10):
        assert torch.equal(noise.randn((2, n), 5, counter=1), long[:, :n])


def test_quad_layout_is_triton_randn4x():
    """Normals 0..3 of a quad are (r01 cos, r01 sin, r23 cos, r23 sin) of its four Philox words."""
    words = [noise.uint32_to_uniform(w) for w in noise.philox4x32([torch.tensor([2])] + [torch.tensor([0])] * 3, 9)]
    want = torch.cat([*noise.box_muller(words[0], words[1]), *noise.box_muller(words[2], words[3])])
    assert torch.equal(noise.randn((1, 12), 9, counter=0)[0, 8:12], want)
