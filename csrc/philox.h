// The fastdiff normal stream (fastdiff/noise.py), shared by the CPU loops and the CUDA kernels:
// Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"), Triton's
// uint -> uniform conversion and Box-Muller, in Triton's randn4x layout (triton/language/random.py):
//
//   key              = (seed & 0xFFFFFFFF, seed >> 32)
//   i0, i1, i2, i3   = Philox4x32-10(counter = (q, global sample index, step counter, stream), key)
//   n0, n1           = r cos th, r sin th   with r = sqrt(-2 log max(u(i0), 1e-7)), th = 2 pi u(i1)
//   n2, n3           = the same from (i2, i3)
//   element e of a sample takes n[e % 4] of quad q = e / 4.
//
// The integer stream is bit-exact. log, sin and cos are written out here (branch-free, no libm call)
// so that the CPU loop vectorises and CPU and GPU evaluate the same polynomials; they are the
// classic fdlibm/musl float kernels (< 1 ulp), so normals agree with libm's to ~1e-7.
// Included by step_math.h (FD_HOST_DEVICE defined there).
#pragma once

#include <math.h>
#include <stdint.h>

#define FD_PHILOX_KEY_A 0x9E3779B9u
#define FD_PHILOX_KEY_B 0xBB67AE85u
#define FD_PHILOX_ROUND_A 0xD2511F53u
#define FD_PHILOX_ROUND_B 0xCD9E8D57u

// One Philox4x32 round function applied 10 times (Salmon et al. 2011, sec. 5; Triton's tl.philox).
FD_HOST_DEVICE inline void fd_philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                                            uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    uint64_t pb = uint64_t(FD_PHILOX_ROUND_B) * c2;  // mulhilo: the 32x32 -> 64-bit product
    uint64_t pa = uint64_t(FD_PHILOX_ROUND_A) * c0;
    uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0;
    uint32_t n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c1 = uint32_t(pb);
    c3 = uint32_t(pa);
    c0 = n0;
    c2 = n2;
    k0 += FD_PHILOX_KEY_A;
    k1 += FD_PHILOX_KEY_B;
  }
}

// Triton's uint_to_uniform_float: bitcast to int32, fold negatives with ~x, scale into [0, 1).
FD_HOST_DEVICE inline float fd_uint_to_uniform(uint32_t bits) {
  int32_t x = int32_t(bits);
  x = x < 0 ? ~x : x;
  return float(x) * 4.6566127342e-10f;
}

FD_HOST_DEVICE inline uint32_t fd_float_bits(float f) {
  union { float f; uint32_t u; } v;
  v.f = f;
  return v.u;
}
FD_HOST_DEVICE inline float fd_bits_float(uint32_t u) {
  union { float f; uint32_t u; } v;
  v.u = u;
  return v.f;
}

// log(x) for finite x > 0 (FreeBSD/musl logf: x = 2^k m, m in [sqrt(2)/2, sqrt(2)), log(1 + f)
// from s = f / (2 + f) and a degree-8 polynomial in s; < 1 ulp).
FD_HOST_DEVICE inline float fd_logf(float x) {
  uint32_t ix = fd_float_bits(x) + (0x3f800000u - 0x3f3504f3u);
  int k = int(ix >> 23) - 0x7f;
  float f = fd_bits_float((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  float s = f / (2.0f + f), z = s * s, w = z * z;
  float t1 = w * (0.40000972152f + w * 0.24279078841f);
  float t2 = z * (0.66666662693f + w * 0.28498786688f);
  float hfsq = 0.5f * f * f, dk = float(k);
  return s * (hfsq + (t1 + t2)) + dk * 9.0580006145e-06f - hfsq + f + dk * 6.9313812256e-01f;
}

// sin and cos of theta in [0, 2 pi] with one range reduction: j = nearest multiple of pi/2,
// r = theta - j pi/2 in double, then musl's __cosdf / __sindf polynomials on |r| <= pi/4;
// j mod 4 picks the polynomial and sign (sin(r + j pi/2), cos(r + j pi/2)).
FD_HOST_DEVICE inline void fd_sincosf(float theta, float& sin_out, float& cos_out) {
  int j = int(float(theta) * 0.63661977236758134f + 0.5f);
  double r = double(theta) - double(j) * 1.57079632679489655800, z = r * r, w = z * z;
  double c = ((1.0 + z * -0.499999997251031003120) + w * 0.0416666233237390631894) +
             (w * z) * (-0.00138867637746099294692 + z * 0.0000243904487962774090654);
  double sz = z * r;
  double s = (r + sz * (-0.166666666416265235595 + z * 0.0083333293858894631756)) +
             sz * w * (-0.000198393348360966317347 + z * 0.0000027183114939898219064);
  const bool odd = (j & 1) != 0;
  double vc = odd ? s : c, vs = odd ? c : s;
  cos_out = float(((j + 1) & 2) ? -vc : vc);  // cos: +cos r, -sin r, -cos r, +sin r
  sin_out = float((j & 2) ? -vs : vs);        // sin: +sin r, +cos r, -sin r, -cos r
}

// Triton's pair_uniform_to_normal in float32: (r cos th, r sin th), r = sqrt(-2 log max(u1, 1e-7)),
// th = 2 pi u2 (Box & Muller 1958).
FD_HOST_DEVICE inline void fd_box_muller(float u1, float u2, float& n_cos, float& n_sin) {
  u1 = u1 < 1.0e-7f ? 1.0e-7f : u1;
  float theta = 6.283185307179586f * u2;
  float radius = sqrtf(-2.0f * fd_logf(u1)), s, c;
  fd_sincosf(theta, s, c);
  n_cos = radius * c;
  n_sin = radius * s;
}

// The four normals of quad q of a sample (Triton's randn4x): one Philox block (q, sample, counter,
// stream) gives (n0, n1) from (i0, i1) and (n2, n3) from (i2, i3); element 4q + w takes n[w].
FD_HOST_DEVICE inline void fd_randn4(uint64_t seed, uint32_t quad, uint32_t sample, uint32_t counter, uint32_t stream,
                                     float n[4]) {
  uint32_t c0 = quad, c1 = sample, c2 = counter, c3 = stream;
  fd_philox4x32_10(c0, c1, c2, c3, uint32_t(seed), uint32_t(seed >> 32));
  fd_box_muller(fd_uint_to_uniform(c0), fd_uint_to_uniform(c1), n[0], n[1]);
  fd_box_muller(fd_uint_to_uniform(c2), fd_uint_to_uniform(c3), n[2], n[3]);
}
