"""Independent numpy Philox4x32-10 + Triton's uniform/Box-Muller: the oracle of the noise stream.

Written from the Philox paper (Salmon et al. 2011) and triton/language/random.py, sharing no code
with fastdiff.noise. uint64 arithmetic holds every 32x32-bit product exactly.
"""
import numpy as np

M32 = np.uint64(0xFFFFFFFF)


def philox(c0, c1, c2, c3, seed, rounds=10):
    c = [np.asarray(x, dtype=np.uint64) & M32 for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    A, B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(rounds):
        pa, pb = A * c[0], B * c[2]
        c = [(pb >> np.uint64(32)) ^ c[1] ^ k0, pb & M32, (pa >> np.uint64(32)) ^ c[3] ^ k1, pa & M32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & M32
    return [x.astype(np.uint32) for x in c]


def to_uniform(u):
    x = u.astype(np.uint32).view(np.int32).astype(np.int64)
    x = np.where(x < 0, -x - 1, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def normal_pair(u1, u2):
    """Box-Muller as Triton's pair_uniform_to_normal: (r cos th, r sin th) in float32."""
    u1 = np.maximum(np.float32(1e-7), u1)
    th = np.float32(6.283185307179586) * u2
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return (r * np.cos(th)).astype(np.float32), (r * np.sin(th)).astype(np.float32)


def randn(shape, seed, counter=0, stream=0, sample_offset=0):
    """Oracle of fastdiff.noise.randn: element e uses normal e % 4 of the Philox block at e // 4.

    Returns (normals, words): words[e] is the raw uint32 Philox word element e's normal starts
    from (i0 for e % 4 in {0, 1}, i2 for {2, 3}) and partner[e] its pair (i1 or i3).
    """
    batch, per_sample = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    quads = (per_sample + 3) // 4
    quad = np.broadcast_to(np.arange(quads, dtype=np.uint64), (batch, quads))
    sample = np.broadcast_to((np.arange(batch, dtype=np.uint64) + np.uint64(sample_offset))[:, None], (batch, quads))
    i0, i1, i2, i3 = philox(quad, sample, np.uint64(counter), np.uint64(stream), seed)
    n0, n1 = normal_pair(to_uniform(i0), to_uniform(i1))
    n2, n3 = normal_pair(to_uniform(i2), to_uniform(i3))

    def interleave(a, b, c, d):
        return np.stack([a, b, c, d], axis=-1).reshape(batch, 4 * quads)[:, :per_sample].reshape(shape)

    return interleave(n0, n1, n2, n3), (interleave(i0, i0, i2, i2), interleave(i1, i1, i3, i3))
