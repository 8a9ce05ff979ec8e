// CPU classifier-free guidance (Ho & Salimans 2022, eq. 6): out = u + w (c - u), fp32 math
// (fp64 for fp64 inputs), written in cond's dtype.
#include <torch/library.h>

#include "../ops.h"
#include "cpu_common.h"

namespace fastdiff {
namespace cpu {
namespace {

template <typename S>
FD_MULTIVERSION void cfg_range(const S* __restrict u, const S* __restrict c, S* __restrict out, int64_t n,
                               math_t<S> w) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = store<S>(fd_cfg(load(u[j]), load(c[j]), w));
}

template <typename S>
void cfg_run(const FdCfgArgs& a) {
  const math_t<S> w = math_t<S>(a.guidance_scale);
  at::parallel_for(0, a.numel, kGrain, [&](int64_t begin, int64_t end) {
    cfg_range<S>(static_cast<const S*>(a.uncond) + begin, static_cast<const S*>(a.cond) + begin,
                 static_cast<S*>(a.out) + begin, end - begin, w);
  });
}

at::Tensor cfg_combine_cpu(const at::Tensor& uncond, const at::Tensor& cond, double guidance_scale) {
  CfgPlan p = plan_cfg_combine(uncond, cond, guidance_scale);
  dispatch_dtype(p.dtype, [&](auto tag) { cfg_run<decltype(tag)>(p.args); });
  finish(p);
  return p.outputs[0];
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff_C, CPU, m) {
  m.impl("cfg_combine", &fastdiff::cpu::cfg_combine_cpu);
}
