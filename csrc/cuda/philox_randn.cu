// CUDA Philox stream (csrc/philox.h, Salmon et al. 2011): the fastdiff_C::philox_randn test op,
// normals and the raw words i0, i1 of every element.
#include "cuda_common.cuh"

namespace fastdiff {
namespace cuda {
namespace {

__global__ void philox_kernel(FdPhiloxArgs a) {
  const int64_t total = a.batch * a.numel;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / a.numel, i = idx - b * a.numel;
    uint32_t c0 = uint32_t(i), c1 = uint32_t(uint64_t(a.sample_offset + b)), c2 = a.counter, c3 = a.stream;
    fd_philox4x32_10(c0, c1, c2, c3, uint32_t(a.seed), uint32_t(a.seed >> 32));
    a.bits[idx] = c0;
    a.bits[total + idx] = c1;
    a.normal[idx] = fd_box_muller(fd_uint_to_uniform(c0), fd_uint_to_uniform(c1));
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fastdiff

void fd_launch_philox_randn(const FdPhiloxArgs& args, void* stream) {
  using namespace fastdiff::cuda;
  const int64_t total = args.batch * args.numel;
  if (total == 0) return;
  philox_kernel<<<blocks_for(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
}
