// CPU generic step (fastdiff.tables: a step is a row of numbers; fastdiff.eager is the ground
// truth). Per-element math: fd_step_element in csrc/step_math.h. The row, its history slots and
// its noise counter are read on the host (CPU tensors), once per call.
//
// One vectorised loop per (storage type, guidance kind, noise source, history or not): 72 loops
// (x3 ISA clones). Everything else is a runtime choice outside the loop: the variance mode fills
// an L1 chunk of per-element stds, unused history reads point at a zero chunk with coefficient -0,
// unwritten outputs (x0, out2, hist) go to an L1 scratch chunk.
#include <torch/library.h>

#include "../ops.h"
#include "cpu_common.h"

namespace fastdiff {
namespace cpu {
namespace {

// Pointers of one chunk. No __restrict: `out` may be `sample` (an in-place step) and a NaN row
// reads and writes history slot 0; every element's inputs are loaded before its outputs are
// stored (one loop iteration), so exact aliasing is correct.
template <typename S>
struct Chunk {
  using C = math_t<S>;
  const S* x;
  const S* u;       // uncond prediction (guidance)
  const S* c;       // cond (or only) prediction
  const S* e;       // extra prediction (FD_GUIDE_CFG_EXTRA)
  const S* n;       // given noise (FD_NOISE_GIVEN)
  const float* z;   // Philox normals (FD_NOISE_PHILOX)
  const C* std;     // per-element noise std (a noise source)
  const S* h[FD_MAX_HISTORY_READS];
  S* out;
  S* x0;
  S* out2;
  S* hist;
};

template <typename S, int G, int N, bool HIST>
FD_MULTIVERSION void step_chunk(const Chunk<S>& p, const FdStepCoefs<math_t<S>>& coefs,
                                const FdClip<math_t<S>>& clip_in, math_t<S> w, math_t<S> w2, int64_t len) {
  using C = math_t<S>;
  const FdStepCoefs<C> k = coefs;  // locals: no store in the loop can change them
  const FdClip<C> clip = clip_in;
  const S *x = p.x, *u = p.u, *c = p.c, *e = p.e, *n = p.n;
  const S *h1 = p.h[0], *h2 = p.h[1], *h3 = p.h[2], *h4 = p.h[3];
  const float* z = p.z;
  const C* std = p.std;
  S *out = p.out, *x0 = p.x0, *out2 = p.out2, *hist = p.hist;
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const C m = fd_guide<G>(G != FD_GUIDE_NONE ? load(u[j]) : C(0), load(c[j]),
                            G == FD_GUIDE_CFG_EXTRA ? load(e[j]) : C(0), w, w2);
    const C nv = N == FD_NOISE_GIVEN ? load(n[j]) : (N == FD_NOISE_PHILOX ? C(z[j]) : C(0));
    const C sd = N != FD_NOISE_NONE ? std[j] : C(0);
    const FdStepOut<C> r = fd_step_element<HIST ? FD_MAX_HISTORY_READS : 0, N != FD_NOISE_NONE>(
        k, clip, load(x[j]), m, nv, sd, HIST ? load(h1[j]) : C(0), HIST ? load(h2[j]) : C(0),
        HIST ? load(h3[j]) : C(0), HIST ? load(h4[j]) : C(0));
    out[j] = store<S>(r.out);
    x0[j] = store<S>(r.x0);
    if (HIST) {
      out2[j] = store<S>(r.out2);
      hist[j] = store<S>(r.hist);
    }
  }
}

// Per-element std of a learned variance mode from the variance channels v.
template <typename S, int VAR>
FD_MULTIVERSION void std_chunk(math_t<S>* out, const S* v, const FdStepCoefs<math_t<S>>& k, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) out[j] = fd_noise_std<VAR>(k, load(v[j]));
}

template <typename S>
void fill_std(math_t<S>* out, const S* v, const FdStepCoefs<math_t<S>>& k, int variance, int64_t len) {
  if (variance == FD_VAR_SQRT)
    std_chunk<S, FD_VAR_SQRT>(out, v, k, len);
  else
    std_chunk<S, FD_VAR_EXP>(out, v, k, len);
}

template <typename S, int G, int N, bool HIST>
void step_run(const FdStepArgs& a, const float* row, uint32_t counter) {
  using C = math_t<S>;
  const FdStepCoefs<C> k = fd_step_coefs<C>(row, HIST ? a.history_reads : 0);
  const C w = C(a.guidance_scale), w2 = C(a.extra_scale);
  const int64_t slot_stride = a.batch * a.numel;
  int64_t read_slot[FD_MAX_HISTORY_READS] = {0, 0, 0, 0};
  for (int j = 0; j < a.history_reads; ++j) read_slot[j] = fd_history_slot(row[FD_READ_SLOT1 + j], a.slots);
  const int64_t out2_slot = fd_history_slot(row[FD_OUT2_SLOT], a.slots);
  const int64_t hist_slot = fd_history_slot(row[FD_HIST_SLOT], a.slots);
  const S* sample = static_cast<const S*>(a.sample);
  const S* model = static_cast<const S*>(a.model);
  S* history = static_cast<S*>(a.history);
  const uint64_t seed = a.seed != nullptr ? uint64_t(*a.seed) : 0;  // a CPU tensor: read on the host
  for_each_range(a.batch, a.numel, [&](int64_t b, int64_t i0, int64_t i1) {
    alignas(64) C std_buf[kChunk];
    alignas(64) S scratch[3][kChunk];  // x0, out2, hist when not written
    if (N != FD_NOISE_NONE && a.variance == FD_VAR_FIXED)
      for (int64_t j = 0, used = std::min(kChunk, i1 - i0); j < used; ++j) std_buf[j] = k.noise_std;
    const C s = a.threshold != nullptr ? C(a.threshold[b]) : C(1);
    const FdClip<C> clip = fd_clip<C>(a.clip_mode, a.clip_range, s);
    const int64_t base = b * a.numel;
    const S* uncond = model + b * a.model_stride;
    const S* cond = uncond + a.cond_offset;
    const uint32_t sample_index = uint32_t(uint64_t(a.sample_offset + b));
    for_each_noise_chunk<N == FD_NOISE_PHILOX>(
        seed, sample_index, counter, FD_STREAM_STEP, i0, i1, [&](int64_t i, int64_t len, const float* normals) {
          Chunk<S> p;
          p.x = sample + base + i;
          p.u = uncond + i;
          p.c = cond + i;
          p.e = G == FD_GUIDE_CFG_EXTRA ? static_cast<const S*>(a.extra) + b * a.extra_stride + i : nullptr;
          p.n = N == FD_NOISE_GIVEN ? static_cast<const S*>(a.noise) + base + i : nullptr;
          p.z = normals;
          p.std = std_buf;
          if (N != FD_NOISE_NONE && a.variance != FD_VAR_FIXED) fill_std<S>(std_buf, cond + a.var_offset + i, k, a.variance, len);
          for (int j = 0; j < FD_MAX_HISTORY_READS; ++j)
            p.h[j] = HIST && j < a.history_reads ? history + read_slot[j] * slot_stride + base + i : zeros<S>();
          p.out = static_cast<S*>(a.out) + base + i;
          p.x0 = a.x0 != nullptr ? static_cast<S*>(a.x0) + base + i : scratch[0];
          p.out2 = HIST && a.write_out2 ? history + out2_slot * slot_stride + base + i : scratch[1];
          p.hist = HIST && a.write_history ? history + hist_slot * slot_stride + base + i : scratch[2];
          step_chunk<S, G, N, HIST>(p, k, clip, w, w2, len);
        });
  });
}

// Samples much smaller than a chunk whose tensors are all flat across samples (no variance channels
// or extra-prediction padding, one clip for all): one chunk covers many whole samples. Only the
// normals are per sample (each sample's own Philox quads), gathered into one buffer first.
inline bool groups_samples(const FdStepArgs& a) {
  return a.numel * 4 <= kChunk && a.model_stride == a.numel && a.threshold == nullptr &&
         a.variance == FD_VAR_FIXED && (a.guidance != FD_GUIDE_CFG_EXTRA || a.extra_stride == a.numel);
}

// The step normals of samples [b0, b1), element after element: every sample's Philox quads in one
// vector loop into buf, then (when a sample's size is not a multiple of 4) each sample's first numel
// normals moved together. buf holds 4 * kChunk floats; returns where the normals start.
inline const float* group_normals(float* buf, const FdStepArgs& a, int64_t b0, int64_t b1, uint64_t seed,
                                  uint32_t counter) {
  const int64_t per_sample = (a.numel + 3) / 4, n = (b1 - b0) * per_sample;  // n <= kChunk (groups_samples)
  alignas(64) uint32_t quad[kChunk], sample[kChunk];
  for (int64_t j = 0; j < n; ++j) {
    quad[j] = uint32_t(j % per_sample);
    sample[j] = uint32_t(uint64_t(a.sample_offset + b0 + j / per_sample));
  }
  fill_quads_of(buf, quad, sample, n, seed, counter, FD_STREAM_STEP);
  if (a.numel % 4 != 0)
    for (int64_t b = 1; b < b1 - b0; ++b)  // in place, forwards: sample b's normals move down, never up
      std::copy(buf + 4 * b * per_sample, buf + 4 * b * per_sample + a.numel, buf + b * a.numel);
  return buf;
}

template <typename S, int G, int N, bool HIST>
void step_grouped(const FdStepArgs& a, const float* row, uint32_t counter) {
  using C = math_t<S>;
  const FdStepCoefs<C> k = fd_step_coefs<C>(row, HIST ? a.history_reads : 0);
  const C w = C(a.guidance_scale), w2 = C(a.extra_scale);
  const FdClip<C> clip = fd_clip<C>(a.clip_mode, a.clip_range, C(1));
  const int64_t slot_stride = a.batch * a.numel;
  const S* sample = static_cast<const S*>(a.sample);
  const S* model = static_cast<const S*>(a.model);
  S* history = static_cast<S*>(a.history);
  const uint64_t seed = a.seed != nullptr ? uint64_t(*a.seed) : 0;
  for_each_sample_group(a.batch, a.numel, [&](int64_t b0, int64_t b1) {
    alignas(64) C std_buf[kChunk];
    alignas(64) S scratch[3][kChunk];  // x0, out2, hist when not written
    alignas(64) float normals[4 * kChunk];  // the samples' quads (<= kChunk of them), then their elements
    const int64_t base = b0 * a.numel, len = (b1 - b0) * a.numel;
    for (int64_t j = 0; j < len; ++j) std_buf[j] = k.noise_std;
    const float* z = normals;
    if (N == FD_NOISE_PHILOX) z = group_normals(normals, a, b0, b1, seed, counter);
    Chunk<S> p;
    p.x = sample + base;
    p.u = model + base;
    p.c = p.u + a.cond_offset;
    p.e = G == FD_GUIDE_CFG_EXTRA ? static_cast<const S*>(a.extra) + base : nullptr;
    p.n = N == FD_NOISE_GIVEN ? static_cast<const S*>(a.noise) + base : nullptr;
    p.z = z;
    p.std = std_buf;
    for (int j = 0; j < FD_MAX_HISTORY_READS; ++j)
      p.h[j] = HIST && j < a.history_reads
                   ? history + fd_history_slot(row[FD_READ_SLOT1 + j], a.slots) * slot_stride + base
                   : zeros<S>();
    p.out = static_cast<S*>(a.out) + base;
    p.x0 = a.x0 != nullptr ? static_cast<S*>(a.x0) + base : scratch[0];
    p.out2 = HIST && a.write_out2 ? history + fd_history_slot(row[FD_OUT2_SLOT], a.slots) * slot_stride + base
                                  : scratch[1];
    p.hist = HIST && a.write_history ? history + fd_history_slot(row[FD_HIST_SLOT], a.slots) * slot_stride + base
                                     : scratch[2];
    step_chunk<S, G, N, HIST>(p, k, clip, w, w2, len);
  });
}

template <typename S, int G, int N, bool HIST>
void step_layout(const FdStepArgs& a, const float* row, uint32_t counter) {
  if (groups_samples(a))
    step_grouped<S, G, N, HIST>(a, row, counter);
  else
    step_run<S, G, N, HIST>(a, row, counter);
}

template <typename S, int G, int N>
void step_history(const FdStepArgs& a, const float* row, uint32_t counter) {
  if (a.history_reads > 0 || a.write_out2 || a.write_history)
    step_layout<S, G, N, true>(a, row, counter);
  else
    step_layout<S, G, N, false>(a, row, counter);
}

template <typename S, int G>
void step_noise(const FdStepArgs& a, const float* row) {
  int source = a.noise_source;
  // Drawing noise that a fixed-variance row scales by 0 twice (std and pre-noise) changes nothing
  // but the sign of a zero sum: skip it (DDPM's last step, DDIM with eta 0, deterministic solvers).
  if (source == FD_NOISE_PHILOX && a.variance == FD_VAR_FIXED && row[FD_NOISE_STD] == 0.0f &&
      row[FD_PRE_NOISE] == 0.0f)
    source = FD_NOISE_NONE;
  const uint32_t counter = fd_row_counter(row[FD_NOISE_COUNTER]);
  switch (source) {
    case FD_NOISE_GIVEN: return step_history<S, G, FD_NOISE_GIVEN>(a, row, counter);
    case FD_NOISE_PHILOX: return step_history<S, G, FD_NOISE_PHILOX>(a, row, counter);
    default: return step_history<S, G, FD_NOISE_NONE>(a, row, counter);
  }
}

template <typename S>
void step_dispatch(const FdStepArgs& a, const float* row) {
  switch (a.guidance) {
    case FD_GUIDE_CFG: return step_noise<S, FD_GUIDE_CFG>(a, row);
    case FD_GUIDE_CFG_EXTRA: return step_noise<S, FD_GUIDE_CFG_EXTRA>(a, row);
    default: return step_noise<S, FD_GUIDE_NONE>(a, row);
  }
}

void step_cpu(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& table,
              const at::Tensor& index, const at::Tensor& history, const at::Tensor& out,
              const c10::optional<at::Tensor>& x0_out, const c10::optional<at::Tensor>& noise,
              const c10::optional<at::Tensor>& seed, int64_t sample_offset, c10::optional<double> guidance_scale,
              const c10::optional<at::Tensor>& guidance_extra, double extra_scale, int64_t variance,
              c10::optional<double> clip_range, const c10::optional<at::Tensor>& threshold, int64_t history_reads,
              bool write_history, bool write_out2, bool advance) {
  StepPlan p = plan_step(model_output, sample, table, index, history, out, x0_out, noise, seed, sample_offset,
                         guidance_scale, guidance_extra, extra_scale, variance, clip_range, threshold, history_reads,
                         write_history, write_out2, advance);
  const FdStepArgs& a = p.args;
  const float* row = a.table + fd_row_index(a.index[0], a.rows) * FD_WIDTH;  // on the host: a CPU tensor
  dispatch_dtype(p.dtype, [&](auto tag) { step_dispatch<decltype(tag)>(a, row); });
  finish(p);
  if (advance) a.index[0] += 1;  // after the step: the row was read above
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_C, CPU, m) {
  m.impl("step", &fastdiff::cpu::step_cpu);
}
