// CPU Philox stream (csrc/philox.h): the vectorised fill of a chunk's normals that every CPU op
// uses for in-kernel noise, and the fastdiff_C::philox_randn test op (normals and, per element,
// the raw Philox word its normal comes from and that word's Box-Muller partner).
#include <torch/library.h>

#include <cstring>

#include "../ops.h"
#include "cpu_common.h"

namespace fastdiff {
namespace cpu {

namespace {

constexpr uint64_t kLow32 = 0xFFFFFFFFull;

// fd_philox4x32_10 with the state in 64-bit lanes holding values < 2^32: the products
// (c & 0xFFFFFFFF) * CONST are 32x32 -> 64-bit multiplies of the low halves (vpmuludq), so the
// vectoriser needs no 32 <-> 64-bit repacking between rounds (~15-25% faster than uint32 lanes,
// measured with AVX-512). Same integer stream (Salmon et al. 2011, Philox4x32-10).
inline void philox_u64_lanes(uint64_t& c0, uint64_t& c1, uint64_t& c2, uint64_t& c3, uint64_t k0, uint64_t k1) {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = (c2 & kLow32) * uint64_t(FD_PHILOX_ROUND_B);
    const uint64_t pa = (c0 & kLow32) * uint64_t(FD_PHILOX_ROUND_A);
    const uint64_t n0 = (pb >> 32) ^ c1 ^ k0, n2 = (pa >> 32) ^ c3 ^ k1;
    c1 = pb & kLow32;
    c3 = pa & kLow32;
    c0 = n0;
    c2 = n2;
    k0 = (k0 + FD_PHILOX_KEY_A) & kLow32;
    k1 = (k1 + FD_PHILOX_KEY_B) & kLow32;
  }
}

}  // namespace

// The normals of quads [q0, q0 + nq) of one sample into out[0, 4 nq) (element 4q + w of the
// sample at out[4 (q - q0) + w]). Branch-free integer and float arithmetic (philox.h): `omp simd`
// turns the quad loop into 8/16-lane vector code; built for AVX-512, AVX2 and the baseline
// (function multiversioning, picked once at load time).
FD_MULTIVERSION
void fill_quads(float* out, int64_t q0, int64_t nq, uint64_t seed, uint32_t sample, uint32_t counter,
                uint32_t stream) {
  float* __restrict o = out;
  const uint64_t k0 = seed & kLow32, k1 = seed >> 32;
#pragma omp simd
  for (int64_t q = 0; q < nq; ++q) {
    uint64_t c0 = uint64_t(q0 + q) & kLow32, c1 = sample, c2 = counter, c3 = stream;
    philox_u64_lanes(c0, c1, c2, c3, k0, k1);
    float n0, n1, n2, n3;
    fd_box_muller(fd_uint_to_uniform(uint32_t(c0)), fd_uint_to_uniform(uint32_t(c1)), n0, n1);
    fd_box_muller(fd_uint_to_uniform(uint32_t(c2)), fd_uint_to_uniform(uint32_t(c3)), n2, n3);
    o[4 * q] = n0;
    o[4 * q + 1] = n1;
    o[4 * q + 2] = n2;
    o[4 * q + 3] = n3;
  }
}

// The normals of n (quad, sample) pairs into out[0, 4 n): pair j is quad quad[j] of global sample
// sample[j] (many small samples in one vector loop; fill_quads is one sample's run of quads).
FD_MULTIVERSION
void fill_quads_of(float* out, const uint32_t* quad, const uint32_t* sample, int64_t n, uint64_t seed,
                   uint32_t counter, uint32_t stream) {
  float* __restrict o = out;
  const uint64_t k0 = seed & kLow32, k1 = seed >> 32;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint64_t c0 = quad[j], c1 = sample[j], c2 = counter, c3 = stream;
    philox_u64_lanes(c0, c1, c2, c3, k0, k1);
    float n0, n1, n2, n3;
    fd_box_muller(fd_uint_to_uniform(uint32_t(c0)), fd_uint_to_uniform(uint32_t(c1)), n0, n1);
    fd_box_muller(fd_uint_to_uniform(uint32_t(c2)), fd_uint_to_uniform(uint32_t(c3)), n2, n3);
    o[4 * j] = n0;
    o[4 * j + 1] = n1;
    o[4 * j + 2] = n2;
    o[4 * j + 3] = n3;
  }
}

const float* fill_normals(float* scratch, int64_t n, uint64_t seed, int64_t first, uint32_t sample,
                          uint32_t counter, uint32_t stream) {
  const int64_t q0 = first / 4, q1 = (first + n + 3) / 4;  // the quads covering [first, first + n)
  fill_quads(scratch, q0, q1 - q0, seed, sample, counter, stream);
  return scratch + (first - 4 * q0);
}

namespace {

// bits[0][e], bits[1][e] for elements [begin, end) of one sample: element 4q + w takes the Philox
// word pair (i0, i1) of quad q when w < 2, (i2, i3) when w >= 2 (scalar: a test op).
void fill_words(const FdPhiloxArgs& a, int64_t b, int64_t begin, int64_t end) {
  const uint32_t sample = uint32_t(uint64_t(a.sample_offset + b));
  int64_t* word = a.bits + b * a.numel;
  int64_t* partner = word + a.batch * a.numel;
  for (int64_t q = begin / 4; 4 * q < end; ++q) {
    uint32_t c[4] = {uint32_t(q), sample, a.counter, a.stream};
    fd_philox4x32_10(c[0], c[1], c[2], c[3], uint32_t(a.seed), uint32_t(a.seed >> 32));
    for (int64_t e = std::max(4 * q, begin); e < std::min(4 * q + 4, end); ++e) {
      const int pair = (e % 4) < 2 ? 0 : 2;
      word[e] = c[pair];
      partner[e] = c[pair + 1];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> philox_randn_cpu(const at::Tensor& like, int64_t seed, int64_t counter,
                                                    int64_t stream, int64_t sample_offset) {
  auto [normal, bits, a] = plan_philox_randn(like, seed, counter, stream, sample_offset);
  for_each_range(a.batch, a.numel, [&](int64_t b, int64_t begin, int64_t end) {
    fill_words(a, b, begin, end);
    const uint32_t sample = uint32_t(uint64_t(a.sample_offset + b));
    for_each_noise_chunk<true>(a.seed, sample, a.counter, a.stream, begin, end,
                               [&](int64_t i, int64_t len, const float* normals) {
                                 std::memcpy(a.normal + b * a.numel + i, normals, sizeof(float) * len);
                               });
  });
  return {normal, bits};
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_C, CPU, m) {
  m.impl("philox_randn", &fastdiff::cpu::philox_randn_cpu);
}
