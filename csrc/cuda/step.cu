// CUDA generic step (fastdiff.tables: a step is a row of numbers; fastdiff.eager is the ground
// truth). Per-element math: fd_step_element in csrc/step_math.h. The kernel reads the step index
// and its row from device memory (no host sync, CUDA-graph safe); `advance` increments the index
// in a one-thread kernel queued after it on the same stream, so no block can read the index after
// it changed.
//
// Kernels per (storage type, packed or not, noise source, history or not): 48. Guidance, variance
// mode, the number of history reads and which outputs are written are uniform branches on kernel
// arguments and row values. FULL (the step reads or writes the history) is a template parameter so
// that the common steps without history (DDPM, DDIM, Euler) keep their register count low.
#include "cuda_common.cuh"

namespace fastdiff {
namespace cuda {
namespace {

// Grid-stride loop over items (cuda_common.cuh: E elements of one sample, one or two Philox quads).
// PACK: every item is whole and aligned, moved with vector loads/stores. Plain loads only (no
// __ldg / non-coherent loads): `out` may be `sample` and history slots are read and written.
template <typename S, bool PACK, int NOISE, bool FULL>
__global__ void __launch_bounds__(kThreads) step_kernel(FdStepArgs a) {
  using C = math_t<S>;
  constexpr int E = item_elems<S>();
  constexpr int Q = E / 4;  // Philox quads per item
  __shared__ float row[FD_WIDTH];
  if (threadIdx.x < FD_WIDTH) row[threadIdx.x] = a.table[fd_row_index(a.index[0], a.rows) * FD_WIDTH + threadIdx.x];
  __syncthreads();

  FdStepCoefs<C> k = fd_step_coefs<C>(row, a.history_reads);
  // A fixed-variance row that scales Philox noise by 0 twice draws none (as the CPU loops).
  const bool noisy = NOISE == FD_NOISE_GIVEN ||
                     (NOISE == FD_NOISE_PHILOX && !(a.variance == FD_VAR_FIXED && row[FD_NOISE_STD] == 0.0f &&
                                                     row[FD_PRE_NOISE] == 0.0f));
  if (!noisy) k.pre_noise = fd_neg_zero<C>();  // n = +0 below: x + (-0) n == x exactly
  const bool learned = noisy && a.variance != FD_VAR_FIXED;
  const uint32_t counter = fd_row_counter(row[FD_NOISE_COUNTER]);
  const uint64_t seed = NOISE == FD_NOISE_PHILOX ? uint64_t(*a.seed) : 0;  // read at run time (graph replays)
  const int64_t slot_stride = a.batch * a.numel;
  const S* read_base[FD_MAX_HISTORY_READS];
#pragma unroll
  for (int j = 0; j < FD_MAX_HISTORY_READS; ++j)
    read_base[j] = FULL && j < a.history_reads
                       ? static_cast<const S*>(a.history) + fd_history_slot(row[FD_READ_SLOT1 + j], a.slots) * slot_stride
                       : nullptr;
  S* out2_base = FULL && a.write_out2 ? static_cast<S*>(a.history) + fd_history_slot(row[FD_OUT2_SLOT], a.slots) * slot_stride
                              : nullptr;
  S* hist_base = FULL && a.write_history
                     ? static_cast<S*>(a.history) + fd_history_slot(row[FD_HIST_SLOT], a.slots) * slot_stride
                     : nullptr;
  const C w = C(a.guidance_scale), w2 = C(a.extra_scale);
  const Pack<S, E> zero = load_item<false, E>(static_cast<const S*>(nullptr), 0);

  const int64_t per_sample = (a.numel + E - 1) / E, items = a.batch * per_sample;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < items; t += int64_t(gridDim.x) * blockDim.x) {
    const Item it = item_of(t, per_sample, a.numel, E);
    const S* uncond = static_cast<const S*>(a.model) + it.b * a.model_stride + it.i;
    const S* cond = uncond + a.cond_offset;
    const auto x = load_item<PACK, E>(static_cast<const S*>(a.sample) + it.idx, it.count);
    const auto c = load_item<PACK, E>(cond, it.count);
    const auto u = a.guidance != FD_GUIDE_NONE ? load_item<PACK, E>(uncond, it.count) : zero;
    const auto e = a.guidance == FD_GUIDE_CFG_EXTRA
                       ? load_item<PACK, E>(static_cast<const S*>(a.extra) + it.b * a.extra_stride + it.i, it.count)
                       : zero;
    const auto v = learned ? load_item<PACK, E>(cond + a.var_offset, it.count) : zero;
    Pack<S, E> h[FD_MAX_HISTORY_READS];
#pragma unroll
    for (int j = 0; j < FD_MAX_HISTORY_READS; ++j)
      h[j] = FULL && read_base[j] != nullptr ? load_item<PACK, E>(read_base[j] + it.idx, it.count) : zero;
    C n[E];
    if (NOISE == FD_NOISE_GIVEN) {
      const auto given = load_item<PACK, E>(static_cast<const S*>(a.noise) + it.idx, it.count);
#pragma unroll
      for (int j = 0; j < E; ++j) n[j] = C(to_math(given.v[j]));
    } else {
      float z[E];
#pragma unroll
      for (int j = 0; j < E; ++j) z[j] = 0.0f;
      if (NOISE == FD_NOISE_PHILOX && noisy) {
        const uint32_t sample = uint32_t(uint64_t(a.sample_offset + it.b));
#pragma unroll
        for (int q = 0; q < Q; ++q) fd_randn4(seed, uint32_t(it.i / 4 + q), sample, counter, FD_STREAM_STEP, z + 4 * q);
      }
#pragma unroll
      for (int j = 0; j < E; ++j) n[j] = C(z[j]);
    }
    const FdClip<C> clip = fd_clip<C>(a.clip_mode, a.clip_range, a.threshold != nullptr ? C(a.threshold[it.b]) : C(1));
    Pack<S, E> out, x0, out2, hist;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const C m = a.guidance == FD_GUIDE_NONE
                      ? C(to_math(c.v[j]))
                      : (a.guidance == FD_GUIDE_CFG
                             ? fd_guide<FD_GUIDE_CFG>(C(to_math(u.v[j])), C(to_math(c.v[j])), C(0), w, w2)
                             : fd_guide<FD_GUIDE_CFG_EXTRA>(C(to_math(u.v[j])), C(to_math(c.v[j])),
                                                            C(to_math(e.v[j])), w, w2));
      const C std = noisy ? fd_noise_std_mode<C>(learned ? a.variance : FD_VAR_FIXED, k, C(to_math(v.v[j])))
                          : fd_neg_zero<C>();
      const FdStepOut<C> res = fd_step_element<FULL ? FD_MAX_HISTORY_READS : 0, true>(
          k, clip, C(to_math(x.v[j])), m, n[j], std, C(to_math(h[0].v[j])), C(to_math(h[1].v[j])),
          C(to_math(h[2].v[j])), C(to_math(h[3].v[j])));
      out.v[j] = from_math<S>(res.out);
      x0.v[j] = from_math<S>(res.x0);
      out2.v[j] = from_math<S>(res.out2);
      hist.v[j] = from_math<S>(res.hist);
    }
    store_item<PACK, E>(static_cast<S*>(a.out) + it.idx, it.count, out);
    if (a.x0 != nullptr) store_item<PACK, E>(static_cast<S*>(a.x0) + it.idx, it.count, x0);
    if (FULL && out2_base != nullptr) store_item<PACK, E>(out2_base + it.idx, it.count, out2);
    if (FULL && hist_base != nullptr) store_item<PACK, E>(hist_base + it.idx, it.count, hist);
  }
}

// The sampler's step counter: index += 1 once every block of the step kernel before it on this
// stream has read it (stream order).
__global__ void advance_kernel(int64_t* index) {
  index[0] += 1;
}

template <typename S>
bool can_pack(const FdStepArgs& a) {
  constexpr int E = item_elems<S>();
  const bool strides = a.numel % E == 0 && a.model_stride % E == 0 && a.cond_offset % E == 0 &&
                       a.var_offset % E == 0 && (a.extra == nullptr || a.extra_stride % E == 0);
  return strides && item_aligned<S>(a.model) && item_aligned<S>(a.sample) && item_aligned<S>(a.noise) &&
         item_aligned<S>(a.extra) && item_aligned<S>(a.out) && item_aligned<S>(a.x0) && item_aligned<S>(a.history);
}

template <typename S, bool PACK, bool FULL>
void launch(const FdStepArgs& a, cudaStream_t stream) {
  const unsigned blocks = blocks_for(a.batch * ((a.numel + item_elems<S>() - 1) / item_elems<S>()));
  switch (a.noise_source) {
    case FD_NOISE_GIVEN: step_kernel<S, PACK, FD_NOISE_GIVEN, FULL><<<blocks, kThreads, 0, stream>>>(a); break;
    case FD_NOISE_PHILOX: step_kernel<S, PACK, FD_NOISE_PHILOX, FULL><<<blocks, kThreads, 0, stream>>>(a); break;
    default: step_kernel<S, PACK, FD_NOISE_NONE, FULL><<<blocks, kThreads, 0, stream>>>(a); break;
  }
}

template <typename S, bool PACK>
void launch_history(const FdStepArgs& a, cudaStream_t stream) {
  if (a.history_reads > 0 || a.write_out2 || a.write_history)
    launch<S, PACK, true>(a, stream);
  else
    launch<S, PACK, false>(a, stream);
}

}  // namespace
}  // namespace cuda
}  // namespace fastdiff

void fd_launch_step(const FdStepArgs& args, int dtype, void* stream) {
  using namespace fastdiff::cuda;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (args.batch * args.numel > 0) {
    dispatch_dtype(dtype, [&](auto tag) {
      using S = decltype(tag);
      can_pack<S>(args) ? launch_history<S, true>(args, s) : launch_history<S, false>(args, s);
    });
  }
  if (args.advance) advance_kernel<<<1, 1, 0, s>>>(args.index);
}
