// CPU forward noising with one q-sample row per sample (fastdiff.reference.q_sample):
// x_t = Q_A x0 + Q_B n, target = Q_P x0 + Q_Q n. Rows are gathered on the host (index outside
// [0, rows - 1): the NaN sentinel row). In-kernel noise is rounded to x0's dtype first (the
// reference draws noise.randn(..., dtype=x0.dtype)).
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "cpu_common.h"

namespace fastdiff {
namespace cpu {
namespace {

// One pass per chunk: every element is loaded before its outputs are stored, so x_t may be x0
// (in place). Unwritten outputs go to a scratch chunk.
template <typename S, bool PHILOX>
FD_MULTIVERSION void q_sample_chunk(const S* x0, const S* given, const float* normals, S* x_t, S* target,
                                    S* noise_out, const math_t<S>* row, int64_t len) {
  using C = math_t<S>;
  const C qa = row[FD_Q_A], qb = row[FD_Q_B], qp = row[FD_Q_P], qq = row[FD_Q_Q];
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const S ns = PHILOX ? store<S>(normals[j]) : given[j];
    const C x = load(x0[j]), n = load(ns);
    x_t[j] = store<S>(fd_lin2(qa, x, qb, n));
    target[j] = store<S>(fd_lin2(qp, x, qq, n));
    noise_out[j] = ns;
  }
}

template <typename S, bool PHILOX>
void q_sample_run(const FdQSampleArgs& a, const std::vector<math_t<S>>& rows) {
  const S* x0 = static_cast<const S*>(a.x0);
  const S* given = static_cast<const S*>(a.noise);
  for_each_range(a.batch, a.numel, [&](int64_t b, int64_t i0, int64_t i1) {
    alignas(64) S scratch[2][kChunk];
    const int64_t base = b * a.numel;
    const uint32_t sample = uint32_t(uint64_t(a.sample_offset + b));
    for_each_noise_chunk<PHILOX>(a.seed, sample, 0u, FD_STREAM_Q_SAMPLE, i0, i1,
                                 [&](int64_t i, int64_t len, const float* normals) {
                                   const int64_t at = base + i;
                                   S* target = a.target != nullptr ? static_cast<S*>(a.target) + at : scratch[0];
                                   S* noise_out = a.noise_out != nullptr ? static_cast<S*>(a.noise_out) + at : scratch[1];
                                   q_sample_chunk<S, PHILOX>(x0 + at, PHILOX ? nullptr : given + at, normals,
                                                             static_cast<S*>(a.x_t) + at, target, noise_out,
                                                             rows.data() + b * FD_Q_WIDTH, len);
                                 });
  });
}

void q_sample_cpu(const at::Tensor& x0, const at::Tensor& table, const at::Tensor& index,
                  const c10::optional<at::Tensor>& noise, int64_t seed, int64_t sample_offset, const at::Tensor& x_t,
                  const c10::optional<at::Tensor>& target, const c10::optional<at::Tensor>& noise_out) {
  QSamplePlan p = plan_q_sample(x0, table, index, noise, seed, sample_offset, x_t, target, noise_out);
  const FdQSampleArgs& a = p.args;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using S = decltype(tag);
    using C = math_t<S>;
    std::vector<C> rows(a.batch * FD_Q_WIDTH);  // the gathered rows, in the math type
    for (int64_t b = 0; b < a.batch; ++b)
      for (int c = 0; c < FD_Q_WIDTH; ++c) rows[b * FD_Q_WIDTH + c] = C(a.table[fd_row_index(a.index[b], a.rows) * FD_Q_WIDTH + c]);
    a.noise != nullptr ? q_sample_run<S, false>(a, rows) : q_sample_run<S, true>(a, rows);
  });
  finish(p);
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_C, CPU, m) {
  m.impl("q_sample", &fastdiff::cpu::q_sample_cpu);
}
