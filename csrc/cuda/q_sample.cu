// CUDA forward noising with one q-sample row per sample (fastdiff.reference.q_sample):
// x_t = Q_A x0 + Q_B n, target = Q_P x0 + Q_Q n. Each sample's row is gathered in the kernel from
// its device index (no host sync; an index outside [0, rows - 1) reads the NaN sentinel row).
// In-kernel noise is rounded to x0's dtype first (reference: noise.randn(..., dtype=x0.dtype)).
#include "cuda_common.cuh"

namespace fastdiff {
namespace cuda {
namespace {

// Grid-stride loop over items (cuda_common.cuh): one or two fd_randn4 calls per item. Every element
// is loaded before its outputs are stored, so x_t may be x0 (in place).
template <typename S, bool PACK, bool PHILOX>
__global__ void __launch_bounds__(kThreads) q_sample_kernel(FdQSampleArgs a) {
  using C = math_t<S>;
  constexpr int E = item_elems<S>();
  constexpr int Q = E / 4;
  const int64_t per_sample = (a.numel + E - 1) / E, items = a.batch * per_sample;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < items; t += int64_t(gridDim.x) * blockDim.x) {
    const Item it = item_of(t, per_sample, a.numel, E);
    const float* row = a.table + fd_row_index(a.index[it.b], a.rows) * FD_Q_WIDTH;
    const C qa = C(row[FD_Q_A]), qb = C(row[FD_Q_B]), qp = C(row[FD_Q_P]), qq = C(row[FD_Q_Q]);
    const auto x0 = load_item<PACK, E>(static_cast<const S*>(a.x0) + it.idx, it.count);
    Pack<S, E> n;
    if (PHILOX) {
      float z[E];
      const uint32_t sample = uint32_t(uint64_t(a.sample_offset + it.b));
#pragma unroll
      for (int q = 0; q < Q; ++q) fd_randn4(a.seed, uint32_t(it.i / 4 + q), sample, 0u, FD_STREAM_Q_SAMPLE, z + 4 * q);
#pragma unroll
      for (int j = 0; j < E; ++j) n.v[j] = from_math<S>(C(z[j]));  // rounded to S first
    } else {
      n = load_item<PACK, E>(static_cast<const S*>(a.noise) + it.idx, it.count);
    }
    Pack<S, E> x_t, target;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const C x = C(to_math(x0.v[j])), nv = C(to_math(n.v[j]));
      x_t.v[j] = from_math<S>(fd_lin2(qa, x, qb, nv));
      target.v[j] = from_math<S>(fd_lin2(qp, x, qq, nv));
    }
    store_item<PACK, E>(static_cast<S*>(a.x_t) + it.idx, it.count, x_t);
    if (a.target != nullptr) store_item<PACK, E>(static_cast<S*>(a.target) + it.idx, it.count, target);
    if (a.noise_out != nullptr) store_item<PACK, E>(static_cast<S*>(a.noise_out) + it.idx, it.count, n);
  }
}

template <typename S>
bool can_pack(const FdQSampleArgs& a) {
  return a.numel % item_elems<S>() == 0 && item_aligned<S>(a.x0) && item_aligned<S>(a.noise) &&
         item_aligned<S>(a.x_t) && item_aligned<S>(a.target) && item_aligned<S>(a.noise_out);
}

template <typename S, bool PACK>
void launch(const FdQSampleArgs& a, cudaStream_t stream) {
  const unsigned blocks = blocks_for(a.batch * ((a.numel + item_elems<S>() - 1) / item_elems<S>()));
  if (a.noise == nullptr)
    q_sample_kernel<S, PACK, true><<<blocks, kThreads, 0, stream>>>(a);
  else
    q_sample_kernel<S, PACK, false><<<blocks, kThreads, 0, stream>>>(a);
}

}  // namespace
}  // namespace cuda
}  // namespace fastdiff

void fd_launch_q_sample(const FdQSampleArgs& args, int dtype, void* stream) {
  using namespace fastdiff::cuda;
  if (args.batch * args.numel == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    can_pack<S>(args) ? launch<S, true>(args, s) : launch<S, false>(args, s);
  });
}
