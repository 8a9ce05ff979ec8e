// Schemas of the fastdiff_C ops (pytorch/extension-cpp style). fastdiff/_cpp.py wraps them with the
// backend signatures of fastdiff.ops and registers their fake (meta) implementations.
// Implementations: csrc/cpu/<op>.cpp (CPU), csrc/cuda/<op>.cu + register_cuda.cpp (CUDA).
//   step:     the generic step of every sampler (fastdiff.tables), out-variant: writes `out`,
//             `x0_out` and the history slots its row names; `advance` adds 1 to `index` afterwards.
//             variance: 0 fixed, 1 sqrt, 2 exp (fastdiff.tables.VARIANCE_MODES).
//   q_sample: x_t (and target, noise) from one q-sample row per sample, out-variant.
#include <Python.h>
#include <torch/library.h>

// `import fastdiff._C` loads this shared library; the ops register when it loads.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastdiff C++/CUDA ops (torch.ops.fastdiff_C)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(fastdiff_C, m) {
  m.def("step(Tensor model_output, Tensor sample, Tensor table, Tensor(a!) index, Tensor(b!) history, "
        "Tensor(c!) out, Tensor(d!)? x0_out, Tensor? noise, Tensor? seed, int sample_offset, float? guidance_scale, "
        "Tensor? guidance_extra, float extra_scale, int variance, float? clip_range, Tensor? threshold, "
        "int history_reads, bool write_history, bool write_out2, bool advance) -> ()");
  m.def("q_sample(Tensor x0, Tensor table, Tensor index, Tensor? noise, int seed, int sample_offset, "
        "Tensor(a!) x_t, Tensor(b!)? target, Tensor(c!)? noise_out) -> ()");
  m.def("cfg_combine(Tensor uncond, Tensor cond, float guidance_scale) -> Tensor");
  // The raw stream, for tests: (normals float32 like `like`, int64 [2, *like.shape] words i0, i1).
  m.def("philox_randn(Tensor like, int seed, int counter, int stream, int sample_offset) -> (Tensor, Tensor)");
}
