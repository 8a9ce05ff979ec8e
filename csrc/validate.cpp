// Input validation and call plans shared by the CPU and CUDA implementations (see ops.h).
// Every error names the argument, the value received and what is allowed.
#include "ops.h"
#include "step_math.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <sstream>
#include <string>

namespace fastdiff {
namespace {

std::string shape_str(const Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FD_F32;
    case at::kDouble: return FD_F64;
    case at::kHalf: return FD_F16;
    case at::kBFloat16: return FD_BF16;
    default: return -1;
  }
}

void check_float(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(dtype_code(t.scalar_type()) >= 0, "fastdiff_C::", op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_device(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "fastdiff_C::", op, ": ", name, " must be on the sample's device ",
              like.device(), ", got ", t.device());
}

void check_seed(const char* op, int64_t seed, int64_t sample_offset) {
  TORCH_CHECK(seed >= 0, "fastdiff_C::", op, ": seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK(sample_offset >= 0, "fastdiff_C::", op, ": sample_offset must be >= 0, got ", sample_offset);
}

// Storage dtype: the sample's when every input shares it, else the math dtype (fp64 for fp64
// samples, fp32 otherwise), so a mixed call computes exactly as the reference does.
at::ScalarType storage_dtype(const Tensor& sample, std::initializer_list<const Tensor*> others) {
  for (const Tensor* t : others)
    if (t != nullptr && t->scalar_type() != sample.scalar_type())
      return sample.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return sample.scalar_type();
}

// An input as the kernels read it: contiguous in the storage dtype (the tensor itself when it already
// is: no dispatcher call on the common path, which matters for small steps).
const void* input(OutputPlan& plan, const Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous())
    plan.keep.push_back(t);
  else
    plan.keep.push_back(t.to(dtype).contiguous());
  return plan.keep.back().const_data_ptr();
}

int64_t per_sample(const Tensor& t) {
  return t.size(0) == 0 ? 0 : t.numel() / t.size(0);
}

bool same_sizes(const Tensor& a, const Tensor& b) {
  return a.sizes() == b.sizes();
}

// Where an output of the kernels goes: `target` itself when it is contiguous in the storage dtype
// and overlaps none of `inputs` except element for element (the same memory in the same layout:
// sample, noise; in-place steps), else a contiguous work buffer that finish() copies into target.
// copy_in: the kernels read it too (the history buffer), so a work buffer starts as its copy.
void* output_into(OutputPlan& plan, const Tensor& target, at::ScalarType dtype,
                  std::initializer_list<const Tensor*> same_element_inputs,
                  std::initializer_list<const Tensor*> other_inputs, bool copy_in = false) {
  bool direct = target.is_contiguous() && target.scalar_type() == dtype;
  for (const Tensor* t : same_element_inputs) {
    if (!direct) break;
    if (t == nullptr || !t->defined()) continue;
    const auto status = at::get_overlap_status(target, *t);
    direct = status == at::MemOverlapStatus::No || status == at::MemOverlapStatus::Full;
  }
  for (const Tensor* t : other_inputs) {
    if (!direct) break;
    if (t == nullptr || !t->defined()) continue;
    direct = at::get_overlap_status(target, *t) == at::MemOverlapStatus::No;
  }
  plan.outputs.push_back(target);
  if (direct) {
    plan.work.push_back(target);
  } else if (copy_in) {
    plan.work.push_back(at::empty(target.sizes(), target.options().dtype(dtype)).copy_(target));
  } else {
    plan.work.push_back(at::empty(target.sizes(), target.options().dtype(dtype)));
  }
  return plan.work.back().mutable_data_ptr();
}

// An output tensor given by the caller: the sample's shape, dtype and device.
void check_output(const char* op, const char* name, const Tensor& t, const Tensor& like, const char* like_name) {
  check_device(op, name, t, like);
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && same_sizes(t, like), "fastdiff_C::", op, ": ", name,
              " must have ", like_name, "'s shape ", shape_str(like), " and dtype ", like.scalar_type(), ", got ",
              shape_str(t), " ", t.scalar_type());
}

// A [R, width] float32 table on the sample's device (R >= 1: the last row is the NaN sentinel).
void check_table(const char* op, const Tensor& table, const Tensor& like, int64_t width) {
  check_device(op, "table", table, like);
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(0) >= 1 && table.size(1) == width,
              "fastdiff_C::", op, ": table must be float32 of shape [rows >= 1, ", width, "], got ",
              table.scalar_type(), " of shape ", shape_str(table));
}

// Model output (fastdiff.reference.split_model_output): batch B ([uncond; cond]: 2B under CFG),
// channels C or 2C ([prediction; variance]), the rest as the sample.
void check_model_output(const char* op, const Tensor& model, const Tensor& sample, bool cfg, bool learned,
                        bool& variance_channels) {
  check_float(op, "model_output", model);
  check_device(op, "model_output", model, sample);
  std::vector<int64_t> want(sample.sizes().begin(), sample.sizes().end());
  want[0] *= cfg ? 2 : 1;
  variance_channels = false;
  if (sample.dim() >= 2 && model.dim() == sample.dim() && model.size(1) == 2 * sample.size(1) &&
      sample.size(1) > 0) {
    want[1] *= 2;
    variance_channels = true;
  }
  TORCH_CHECK(model.sizes() == c10::IntArrayRef(want) && (variance_channels || !learned), "fastdiff_C::", op,
              ": model_output must have shape ", c10::IntArrayRef(want), learned ? " with 2x the sample's channels" : "",
              " (sample ", shape_str(sample), cfg ? ", [uncond; cond] batch for guidance" : "",
              learned ? ", [prediction; variance] channels for a learned variance mode" : "", "), got ",
              shape_str(model));
}

}  // namespace

StepPlan plan_step(const Tensor& model_output, const Tensor& sample, const Tensor& table, const Tensor& index,
                   const Tensor& history, const Tensor& out, const c10::optional<Tensor>& x0_out,
                   const c10::optional<Tensor>& noise, const c10::optional<Tensor>& seed, int64_t sample_offset,
                   c10::optional<double> guidance_scale, const c10::optional<Tensor>& guidance_extra,
                   double extra_scale, int64_t variance, c10::optional<double> clip_range,
                   const c10::optional<Tensor>& threshold, int64_t history_reads, bool write_history,
                   bool write_out2, bool advance) {
  const char* op = "step";
  check_float(op, "sample", sample);
  TORCH_CHECK(sample.dim() >= 1, "fastdiff_C::step: sample must have a batch dimension, got shape ",
              shape_str(sample));
  TORCH_CHECK(variance >= FD_VAR_FIXED && variance <= FD_VAR_EXP,
              "fastdiff_C::step: variance must be 0 (fixed), 1 (sqrt) or 2 (exp), got ", variance);
  TORCH_CHECK(history_reads >= 0 && history_reads <= FD_MAX_HISTORY_READS, "fastdiff_C::step: history_reads must be in [0, ",
              FD_MAX_HISTORY_READS, "], got ", history_reads);
  check_seed(op, 0, sample_offset);
  if (seed.has_value()) {
    check_device(op, "seed", *seed, sample);
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, "fastdiff_C::step: seed must be an int64 "
                "tensor of one element (the Philox key), got ", seed->scalar_type(), " of shape ", shape_str(*seed));
  }
  const bool cfg = guidance_scale.has_value();
  bool variance_channels = false;
  // A learned variance mode needs the variance channels when the step has noise (the reference
  // forms the std only then).
  const bool noisy = noise.has_value() || seed.has_value();
  check_model_output(op, model_output, sample, cfg, variance != FD_VAR_FIXED && noisy, variance_channels);
  check_table(op, table, sample, FD_WIDTH);
  check_device(op, "index", index, sample);
  TORCH_CHECK(index.scalar_type() == at::kLong && index.numel() == 1,
              "fastdiff_C::step: index must be an int64 tensor of one element (the step index), got ",
              index.scalar_type(), " of shape ", shape_str(index));
  if (noise.has_value()) {
    check_float(op, "noise", *noise);
    check_device(op, "noise", *noise, sample);
    TORCH_CHECK(same_sizes(*noise, sample), "fastdiff_C::step: noise must have the sample's shape ",
                shape_str(sample), ", got ", shape_str(*noise));
  }
  const bool extra = cfg && guidance_extra.has_value();
  if (extra) {
    const Tensor& e = *guidance_extra;
    check_float(op, "guidance_extra", e);
    check_device(op, "guidance_extra", e, sample);
    bool ok = e.dim() == sample.dim() && e.size(0) == sample.size(0);
    for (int64_t d = 1; ok && d < sample.dim(); ++d) ok = d == 1 ? e.size(1) >= sample.size(1) : e.size(d) == sample.size(d);
    TORCH_CHECK(ok, "fastdiff_C::step: guidance_extra must have the sample's shape ", shape_str(sample),
                " (at least its channels: the first are used), got ", shape_str(e));
  }
  TORCH_CHECK(!clip_range.has_value() || *clip_range >= 0.0, "fastdiff_C::step: clip_range must be >= 0, got ",
              clip_range.value_or(0.0));
  const int64_t batch = sample.size(0);
  if (threshold.has_value()) {
    check_device(op, "threshold", *threshold, sample);
    TORCH_CHECK(threshold->is_floating_point() && threshold->numel() == batch, "fastdiff_C::step: threshold must hold one float per sample (",
                batch, "), got ", threshold->scalar_type(), " of shape ", shape_str(*threshold));
  }
  check_output(op, "out", out, sample, "the sample");
  if (x0_out.has_value()) check_output(op, "x0_out", *x0_out, sample, "the sample");
  const bool uses_history = history_reads > 0 || write_history || write_out2;
  if (uses_history) {
    check_device(op, "history", history, sample);
    bool ok = history.scalar_type() == sample.scalar_type() && history.dim() == sample.dim() + 1 &&
              history.size(0) >= 1 && history.sizes().slice(1) == sample.sizes();
    TORCH_CHECK(ok, "fastdiff_C::step: history must be [slots >= 1, *sample.shape] = [slots, ",
                c10::IntArrayRef(sample.sizes()), "] of the sample's dtype ", sample.scalar_type(),
                " when the step reads or writes it (history_reads=", history_reads, ", write_history=", write_history,
                ", write_out2=", write_out2, "), got ", history.scalar_type(), " of shape ", shape_str(history));
  }

  StepPlan p;
  p.keep.reserve(8);
  p.outputs.reserve(3);
  p.work.reserve(3);
  const Tensor* noise_t = noise.has_value() ? &*noise : nullptr;
  const Tensor* extra_t = extra ? &*guidance_extra : nullptr;
  at::ScalarType dt = storage_dtype(sample, {&model_output, noise_t, extra_t});
  p.dtype = dtype_code(dt);
  FdStepArgs& a = p.args;
  a.sample = input(p, sample, dt);
  const Tensor sample_buf = p.keep.back();
  a.model = input(p, model_output, dt);
  const Tensor model_buf = p.keep.back();
  Tensor noise_buf, extra_buf, history_buf;
  a.noise = nullptr;
  if (noise_t != nullptr) {
    a.noise = input(p, *noise_t, dt);
    noise_buf = p.keep.back();
  }
  a.extra = nullptr;
  if (extra_t != nullptr) {
    a.extra = input(p, *extra_t, dt);
    extra_buf = p.keep.back();
  }
  p.keep.push_back(table.contiguous());
  a.table = p.keep.back().const_data_ptr<float>();
  a.rows = table.size(0);
  a.index = index.mutable_data_ptr<int64_t>();
  a.threshold = nullptr;
  a.clip_mode = clip_range.has_value() ? FD_CLIP_RANGE : FD_CLIP_NONE;
  a.clip_range = clip_range.value_or(0.0);
  if (threshold.has_value()) {
    p.keep.push_back(threshold->to(at::kDouble).contiguous());
    a.threshold = p.keep.back().const_data_ptr<double>();
    a.clip_mode = FD_CLIP_THRESHOLD;
  }
  a.batch = batch;
  a.numel = per_sample(sample);
  a.model_stride = variance_channels ? 2 * a.numel : a.numel;
  a.cond_offset = cfg ? batch * a.model_stride : 0;
  a.var_offset = a.numel;
  a.extra_stride = extra ? per_sample(*extra_t) : 0;
  a.guidance = !cfg ? FD_GUIDE_NONE : (extra ? FD_GUIDE_CFG_EXTRA : FD_GUIDE_CFG);
  a.guidance_scale = guidance_scale.value_or(1.0);
  a.extra_scale = extra_scale;
  a.noise_source = noise_t != nullptr ? FD_NOISE_GIVEN : (seed.has_value() ? FD_NOISE_PHILOX : FD_NOISE_NONE);
  a.variance = int(variance);
  a.history_reads = int(history_reads);
  a.write_out2 = write_out2;
  a.write_history = write_history;
  a.advance = advance;
  a.seed = nullptr;
  if (seed.has_value() && noise_t == nullptr) {
    p.keep.push_back(seed->contiguous());
    a.seed = p.keep.back().const_data_ptr<int64_t>();
  }
  a.sample_offset = sample_offset;
  a.history = nullptr;
  a.slots = 0;
  if (uses_history) {
    a.slots = history.size(0);
    if (write_history || write_out2) {
      a.history = output_into(p, history, dt, {}, {&sample_buf, &model_buf, &noise_buf, &extra_buf}, true);
      history_buf = p.work.back();
    } else {
      a.history = const_cast<void*>(input(p, history, dt));
      history_buf = p.keep.back();
    }
  }
  a.out = output_into(p, out, dt, {&sample_buf, &noise_buf}, {&model_buf, &extra_buf, &history_buf});
  const Tensor out_buf = p.work.back();
  a.x0 = nullptr;
  if (x0_out.has_value())
    a.x0 = output_into(p, *x0_out, dt, {&sample_buf, &noise_buf}, {&model_buf, &extra_buf, &history_buf, &out_buf});
  return p;
}

QSamplePlan plan_q_sample(const Tensor& x0, const Tensor& table, const Tensor& index,
                          const c10::optional<Tensor>& noise, int64_t seed, int64_t sample_offset, const Tensor& x_t,
                          const c10::optional<Tensor>& target, const c10::optional<Tensor>& noise_out) {
  const char* op = "q_sample";
  check_float(op, "x0", x0);
  TORCH_CHECK(x0.dim() >= 1, "fastdiff_C::q_sample: x0 must have a batch dimension, got shape ", shape_str(x0));
  check_seed(op, seed, sample_offset);
  check_table(op, table, x0, FD_Q_WIDTH);
  check_device(op, "index", index, x0);
  TORCH_CHECK(!index.is_floating_point() && !index.is_complex() && index.scalar_type() != at::kBool &&
                  index.numel() == x0.size(0),
              "fastdiff_C::q_sample: index must hold one integer row index per sample (", x0.size(0), "), got ",
              index.scalar_type(), " of shape ", shape_str(index));
  if (noise.has_value()) {
    check_float(op, "noise", *noise);
    check_device(op, "noise", *noise, x0);
    TORCH_CHECK(same_sizes(*noise, x0), "fastdiff_C::q_sample: noise must have x0's shape ", shape_str(x0), ", got ",
                shape_str(*noise));
  }
  check_output(op, "x_t", x_t, x0, "x0");
  if (target.has_value()) check_output(op, "target", *target, x0, "x0");
  if (noise_out.has_value()) check_output(op, "noise_out", *noise_out, x0, "x0");
  QSamplePlan p;
  const Tensor* noise_t = noise.has_value() ? &*noise : nullptr;
  at::ScalarType dt = storage_dtype(x0, {noise_t});
  p.dtype = dtype_code(dt);
  FdQSampleArgs& a = p.args;
  a.x0 = input(p, x0, dt);
  const Tensor x0_buf = p.keep.back();
  Tensor noise_buf;
  a.noise = nullptr;
  if (noise_t != nullptr) {
    a.noise = input(p, *noise_t, dt);
    noise_buf = p.keep.back();
  }
  p.keep.push_back(table.contiguous());
  a.table = p.keep.back().const_data_ptr<float>();
  a.rows = table.size(0);
  p.keep.push_back(index.to(at::kLong).contiguous());
  a.index = p.keep.back().const_data_ptr<int64_t>();
  a.batch = x0.size(0);
  a.numel = per_sample(x0);
  a.seed = uint64_t(seed);
  a.sample_offset = sample_offset;
  // Each element is read before any output of it is written (one pass), so outputs may alias the
  // inputs element for element (x_t = x0 in place).
  a.x_t = output_into(p, x_t, dt, {&x0_buf, &noise_buf}, {});
  const Tensor x_t_buf = p.work.back();
  Tensor target_buf;
  a.target = nullptr;
  if (target.has_value()) {
    a.target = output_into(p, *target, dt, {&x0_buf, &noise_buf}, {&x_t_buf});
    target_buf = p.work.back();
  }
  a.noise_out = nullptr;
  if (noise_out.has_value())
    a.noise_out = output_into(p, *noise_out, dt, {&x0_buf, &noise_buf}, {&x_t_buf, &target_buf});
  return p;
}

CfgPlan plan_cfg_combine(const Tensor& uncond, const Tensor& cond, double guidance_scale) {
  check_float("cfg_combine", "cond", cond);
  check_float("cfg_combine", "uncond", uncond);
  check_device("cfg_combine", "uncond", uncond, cond);
  TORCH_CHECK(uncond.sizes() == cond.sizes(), "fastdiff_C::cfg_combine: uncond must have cond's shape ",
              shape_str(cond), ", got ", shape_str(uncond));
  CfgPlan p;
  at::ScalarType dt = storage_dtype(cond, {&uncond});
  p.dtype = dtype_code(dt);
  p.args.uncond = input(p, uncond, dt);
  p.args.cond = input(p, cond, dt);
  p.args.numel = cond.numel();
  p.args.guidance_scale = guidance_scale;
  p.args.out = output_into(p, at::empty_like(cond), dt, {}, {});
  return p;
}

std::tuple<Tensor, Tensor, FdPhiloxArgs> plan_philox_randn(const Tensor& like, int64_t seed, int64_t counter,
                                                           int64_t stream, int64_t sample_offset) {
  TORCH_CHECK(like.dim() >= 1, "fastdiff_C::philox_randn: like must have a batch dimension, got shape ",
              shape_str(like));
  check_seed("philox_randn", seed, sample_offset);
  TORCH_CHECK(counter >= 0 && counter < (int64_t(1) << 32), "fastdiff_C::philox_randn: counter must be in [0, 2**32), got ", counter);
  TORCH_CHECK(stream >= 0 && stream < (int64_t(1) << 32), "fastdiff_C::philox_randn: stream must be in [0, 2**32), got ", stream);
  Tensor normal = at::empty(like.sizes(), like.options().dtype(at::kFloat));
  std::vector<int64_t> bits_shape{2};
  bits_shape.insert(bits_shape.end(), like.sizes().begin(), like.sizes().end());
  Tensor bits = at::empty(bits_shape, like.options().dtype(at::kLong));
  FdPhiloxArgs a{normal.mutable_data_ptr<float>(), bits.mutable_data_ptr<int64_t>(), like.size(0), per_sample(like),
                 uint64_t(seed), sample_offset, uint32_t(counter), uint32_t(stream)};
  return {normal, bits, a};
}

void finish(OutputPlan& plan) {
  for (size_t i = 0; i < plan.outputs.size(); ++i)
    if (!plan.outputs[i].is_same(plan.work[i])) plan.outputs[i].copy_(plan.work[i]);
}

}  // namespace fastdiff
