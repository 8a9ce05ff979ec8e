// CPU Philox stream (csrc/philox.h): the vectorised chunk fill every CPU op uses for in-kernel
// noise, and the fastdiff_C::philox_randn test op (normals and the raw words i0, i1).
#include <torch/library.h>

#include "../ops.h"
#include "cpu_common.h"

namespace fastdiff {
namespace cpu {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FD_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FD_MULTIVERSION
#endif

// Counter (first + j, sample, counter, stream) for element j: the loop is branch-free integer and
// float arithmetic (philox.h), so `omp simd` turns it into 8/16-lane vector code.
FD_MULTIVERSION
void fill_normals(float* out, int64_t n, uint64_t seed, uint32_t first, uint32_t sample, uint32_t counter,
                  uint32_t stream) {
  float* __restrict o = out;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) o[j] = fd_randn(seed, first + uint32_t(j), sample, counter, stream);
}

namespace {

std::tuple<at::Tensor, at::Tensor> philox_randn_cpu(const at::Tensor& like, int64_t seed, int64_t counter,
                                                    int64_t stream, int64_t sample_offset) {
  auto [normal, bits, a] = plan_philox_randn(like, seed, counter, stream, sample_offset);
  const int64_t total = a.batch * a.numel;
  for_each_range(a.batch, a.numel, [&](int64_t b, int64_t begin, int64_t end) {
    const uint32_t sample = uint32_t(uint64_t(a.sample_offset + b));
    for (int64_t i = begin; i < end; ++i) {
      uint32_t c0 = uint32_t(i), c1 = sample, c2 = a.counter, c3 = a.stream;
      fd_philox4x32_10(c0, c1, c2, c3, uint32_t(a.seed), uint32_t(a.seed >> 32));
      a.bits[b * a.numel + i] = c0;
      a.bits[total + b * a.numel + i] = c1;
    }
    for (int64_t i = begin; i < end; i += kChunk)
      fill_normals(a.normal + b * a.numel + i, std::min(kChunk, end - i), a.seed, uint32_t(i), sample, a.counter,
                   a.stream);
  });
  return {normal, bits};
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_C, CPU, m) {
  m.impl("philox_randn", &fastdiff::cpu::philox_randn_cpu);
}
