// Schemas of the fastdiff_C ops (pytorch/extension-cpp style). The Python side (fastdiff/_cpp.py)
// converts the string arguments of fastdiff.ops to the int codes below and registers the fake
// (meta) implementations. Implementations: csrc/cpu/<op>.cpp (CPU), csrc/cuda/ (CUDA).
//   prediction:    0 epsilon, 1 sample, 2 v_prediction       (fastdiff.tables.prediction_code)
//   variance_mode: 0 fixed, 1 learned, 2 learned_range       (fastdiff.tables.variance_mode)
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
  m.def("ddpm_step(Tensor model_output, Tensor sample, Tensor coefs, Tensor? noise, int seed, int sample_offset, "
        "int prediction, int variance_mode, float? clip_sample_range, Tensor? threshold, float? guidance_scale, "
        "bool write_x0) -> (Tensor, Tensor)");
  m.def("ddim_step(Tensor model_output, Tensor sample, Tensor coefs, Tensor? noise, int seed, int sample_offset, "
        "int prediction, float eta, bool use_clipped_model_output, float? clip_sample_range, Tensor? threshold, "
        "float? guidance_scale, bool write_x0) -> (Tensor, Tensor)");
  m.def("q_sample(Tensor x0, Tensor timesteps, Tensor alphas_cumprod, Tensor? noise, int seed, int sample_offset, "
        "bool write_noise, bool write_v) -> (Tensor, Tensor, Tensor)");
  m.def("cfg_combine(Tensor uncond, Tensor cond, float guidance_scale) -> Tensor");
  // The raw stream, for tests: (normals float32 like `like`, int64 [2, *like.shape] words i0, i1).
  m.def("philox_randn(Tensor like, int seed, int counter, int stream, int sample_offset) -> (Tensor, Tensor)");
}
