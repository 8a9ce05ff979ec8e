// Shared by the CPU ops: storage loads/stores, the parallel split over (sample, element range)
// and the vectorised fill of a chunk of Philox normals.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "../step_args.h"
#include "../step_math.h"

// The inner loops are built for AVX-512 and AVX2 as well as the baseline ISA and the best one is
// picked once at load time (GCC function multiversioning): the extension is built without -march,
// so without this the loops would be SSE2, 4 floats wide.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FD_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FD_MULTIVERSION
#endif

namespace fastdiff {
namespace cpu {

// Elements per inner chunk: the Philox normals of a chunk live in a stack buffer (L1-resident).
constexpr int64_t kChunk = 512;
// Elements per parallel task: big enough to amortise a task, small enough to balance 2-64 cores.
constexpr int64_t kGrain = 32768;

// Math type of a storage type: double for double, float otherwise (reference.compute_dtype).
template <typename S>
using math_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <typename S>
inline math_t<S> load(S v) {
  return static_cast<math_t<S>>(v);
}
template <typename S, typename C>
inline S store(C v) {
  return static_cast<S>(v);
}

// kChunk zero bytes x 8 (any storage type): the inputs of terms a call does not have.
alignas(64) inline const unsigned char kZeros[kChunk * 8] = {};

template <typename S>
inline const S* zeros() {
  return reinterpret_cast<const S*>(kZeros);
}

// Scratch for the normals of a chunk: the covering quads of up to kChunk elements that start at
// any element (an unaligned head costs up to 3 extra normals, the tail up to 3 more).
constexpr int64_t kScratch = kChunk + 8;

// Normals of elements [first, first + n) of one sample (n <= kChunk): computes the Philox quads
// covering the range into scratch (kScratch floats, 64-byte aligned) and returns the address of
// element `first`'s normal in it (scratch + first % 4). Vectorised (csrc/cpu/philox_randn.cpp).
const float* fill_normals(float* scratch, int64_t n, uint64_t seed, int64_t first, uint32_t sample,
                          uint32_t counter, uint32_t stream);

// The normals of n (quad, sample) pairs into out[0, 4 n) (pair j: quad quad[j] of global sample
// sample[j]): the Philox quads of many small samples in one vector loop (csrc/cpu/philox_randn.cpp).
void fill_quads_of(float* out, const uint32_t* quad, const uint32_t* sample, int64_t n, uint64_t seed,
                   uint32_t counter, uint32_t stream);

// Runs body(b, begin, end) over every (sample b, element range [begin, end) of that sample) of a
// batch of `batch` samples of `numel` elements, in parallel; ranges never cross a sample.
template <typename F>
void for_each_range(int64_t batch, int64_t numel, const F& body) {
  if (batch == 0 || numel == 0) return;
  at::parallel_for(0, batch * numel, kGrain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      int64_t b = begin / numel, i = begin - b * numel;
      int64_t stop = std::min(end - b * numel, numel);
      body(b, i, stop);
      begin = b * numel + stop;
    }
  });
}

// Runs body(b0, b1) over groups of whole samples [b0, b1) of at most kChunk elements together, in
// parallel: for samples much smaller than a chunk (2-D points), one vectorised loop covers many
// samples instead of one short loop per sample.
template <typename F>
void for_each_sample_group(int64_t batch, int64_t numel, const F& body) {
  if (batch == 0 || numel == 0) return;
  const int64_t group = std::max<int64_t>(1, kChunk / numel);
  at::parallel_for(0, batch, std::max<int64_t>(1, kGrain / numel), [&](int64_t begin, int64_t end) {
    for (int64_t b0 = begin; b0 < end; b0 += group) body(b0, std::min(b0 + group, end));
  });
}

// Runs chunk(begin, len, normals) over elements [i0, i1) of one sample in chunks of at most kChunk
// elements; when PHILOX, normals holds the chunk's normals of the stream (seed, sample, counter,
// stream), else it is null. Chunks end on multiples of kChunk, so only a range's first chunk can
// start inside a Philox quad.
template <bool PHILOX, typename F>
void for_each_noise_chunk(uint64_t seed, uint32_t sample, uint32_t counter, uint32_t stream, int64_t i0, int64_t i1,
                          const F& chunk) {
  alignas(64) float scratch[kScratch];
  for (int64_t i = i0; i < i1;) {
    const int64_t len = std::min((i / kChunk + 1) * kChunk, i1) - i;
    const float* normals = nullptr;
    if constexpr (PHILOX) normals = fill_normals(scratch, len, seed, i, sample, counter, stream);
    chunk(i, len, normals);
    i += len;
  }
}

// Dispatch of the storage type (FdDtype) to a template parameter.
template <typename F>
void dispatch_dtype(int dtype, const F& f) {
  switch (dtype) {
    case FD_F32: f(float{}); break;
    case FD_F64: f(double{}); break;
    case FD_F16: f(c10::Half{}); break;
    case FD_BF16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "fastdiff_C: unsupported storage dtype code ", dtype);
  }
}

}  // namespace cpu
}  // namespace fastdiff
