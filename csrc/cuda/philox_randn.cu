// CUDA Philox stream (csrc/philox.h, Salmon et al. 2011): the fastdiff_C::philox_randn test op,
// the normals and, per element, its Philox word and that word's Box-Muller partner.
#include "cuda_common.cuh"

namespace fastdiff {
namespace cuda {
namespace {

// One thread per quad: element 4q + w takes normal w and the word pair (i0, i1) (w < 2) or
// (i2, i3) (w >= 2) of Philox block (q, sample, counter, stream).
__global__ void philox_kernel(FdPhiloxArgs a) {
  const int64_t total = a.batch * a.numel, quads = quads_of(a.numel), items = a.batch * quads;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < items; t += int64_t(gridDim.x) * blockDim.x) {
    const QuadItem q = quad_item(t, quads, a.numel);
    uint32_t c[4] = {uint32_t(q.q), uint32_t(uint64_t(a.sample_offset + q.b)), a.counter, a.stream};
    fd_philox4x32_10(c[0], c[1], c[2], c[3], uint32_t(a.seed), uint32_t(a.seed >> 32));
    float n[4];
    fd_box_muller(fd_uint_to_uniform(c[0]), fd_uint_to_uniform(c[1]), n[0], n[1]);
    fd_box_muller(fd_uint_to_uniform(c[2]), fd_uint_to_uniform(c[3]), n[2], n[3]);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (e < q.count) {
        a.normal[q.idx + e] = n[e];
        a.bits[q.idx + e] = c[e < 2 ? 0 : 2];
        a.bits[total + q.idx + e] = c[e < 2 ? 1 : 3];
      }
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fastdiff

void fd_launch_philox_randn(const FdPhiloxArgs& args, void* stream) {
  using namespace fastdiff::cuda;
  if (args.batch * args.numel == 0) return;
  const int64_t items = args.batch * quads_of(args.numel);
  philox_kernel<<<blocks_for(items), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
}
