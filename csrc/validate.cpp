// Input validation and call plans shared by the CPU and CUDA implementations (see ops.h).
// Every error names the argument, the value received and what is allowed.
#include "ops.h"
#include "step_math.h"

#include <ATen/ATen.h>

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

const void* input(OutputPlan& plan, const Tensor& t, at::ScalarType dtype) {
  plan.keep.push_back(t.to(dtype).contiguous());
  return plan.keep.back().const_data_ptr();
}

// An output laid out as torch.empty_like(like) (or (0,) when not wanted) and its work buffer.
void* output(OutputPlan& plan, const Tensor& like, at::ScalarType dtype, bool wanted) {
  if (!wanted) {
    plan.outputs.push_back(like.new_empty({0}));
    plan.work.push_back(plan.outputs.back());
    return nullptr;
  }
  Tensor out = at::empty_like(like);
  bool direct = out.is_contiguous() && out.scalar_type() == dtype;
  plan.outputs.push_back(out);
  plan.work.push_back(direct ? out : at::empty(like.sizes(), like.options().dtype(dtype)));
  return plan.work.back().mutable_data_ptr();
}

int64_t per_sample(const Tensor& t) {
  return t.size(0) == 0 ? 0 : t.numel() / t.size(0);
}

// Model output shape: batch B (2B under CFG), channels C (2C for learned variance), rest as sample.
void check_model_output(const char* op, const Tensor& model, const Tensor& sample, bool cfg, bool learned) {
  check_float(op, "model_output", model);
  check_device(op, "model_output", model, sample);
  std::vector<int64_t> want(sample.sizes().begin(), sample.sizes().end());
  want[0] *= cfg ? 2 : 1;
  if (learned) want[1] *= 2;
  TORCH_CHECK(model.sizes() == c10::IntArrayRef(want), "fastdiff_C::", op, ": model_output must have shape ",
              c10::IntArrayRef(want), " (sample ", shape_str(sample), cfg ? ", [uncond; cond] batch for CFG" : "",
              learned ? ", 2x channels for learned variance" : "", "), got ", shape_str(model));
}

void plan_step_common(StepPlan& p, const char* op, const Tensor& model, const Tensor& sample, const Tensor& coefs,
                      const c10::optional<Tensor>& noise, int64_t seed, int64_t sample_offset, int64_t prediction,
                      bool learned, c10::optional<double> clip, const c10::optional<Tensor>& threshold,
                      c10::optional<double> guidance, bool write_x0) {
  check_float(op, "sample", sample);
  TORCH_CHECK(sample.dim() >= (learned ? 2 : 1), "fastdiff_C::", op, ": sample must have a batch dimension",
              learned ? " and a channel dimension" : "", ", got shape ", shape_str(sample));
  TORCH_CHECK(prediction >= 0 && prediction <= FD_PRED_V, "fastdiff_C::", op,
              ": prediction must be 0 (epsilon), 1 (sample) or 2 (v_prediction), got ", prediction);
  check_seed(op, seed, sample_offset);
  check_model_output(op, model, sample, guidance.has_value(), learned);
  check_device(op, "coefs", coefs, sample);
  TORCH_CHECK(coefs.numel() == FD_WIDTH && coefs.is_floating_point(), "fastdiff_C::", op,
              ": coefs must be one floating-point table row of ", FD_WIDTH, " values, got ", coefs.scalar_type(),
              " of shape ", shape_str(coefs));
  if (noise.has_value()) {
    check_float(op, "noise", *noise);
    check_device(op, "noise", *noise, sample);
    TORCH_CHECK(noise->sizes() == sample.sizes(), "fastdiff_C::", op, ": noise must have the sample's shape ",
                shape_str(sample), ", got ", shape_str(*noise));
  }
  TORCH_CHECK(!clip.has_value() || *clip >= 0.0, "fastdiff_C::", op, ": clip_sample_range must be >= 0, got ",
              clip.value_or(0.0));
  const int64_t batch = sample.size(0);
  at::ScalarType dt = storage_dtype(sample, {&model, noise.has_value() ? &*noise : nullptr});
  p.dtype = dtype_code(dt);
  FdStepArgs& a = p.args;
  a.sample = input(p, sample, dt);
  a.model = input(p, model, dt);
  a.noise = noise.has_value() ? input(p, *noise, dt) : nullptr;
  p.keep.push_back(coefs.to(at::kFloat).contiguous());
  a.coefs = p.keep.back().const_data_ptr<float>();
  a.threshold = nullptr;
  a.clip_mode = clip.has_value() ? FD_CLIP_RANGE : FD_CLIP_NONE;
  a.clip_range = clip.value_or(0.0);
  if (threshold.has_value()) {
    check_device(op, "threshold", *threshold, sample);
    TORCH_CHECK(threshold->numel() == batch, "fastdiff_C::", op, ": threshold must hold one value per sample (",
                batch, "), got shape ", shape_str(*threshold));
    p.keep.push_back(threshold->to(at::kDouble).contiguous());
    a.threshold = p.keep.back().const_data_ptr<double>();
    a.clip_mode = FD_CLIP_THRESHOLD;
  }
  a.batch = batch;
  a.numel = per_sample(sample);
  a.model_stride = learned ? 2 * a.numel : a.numel;
  a.cfg = guidance.has_value();
  a.cond_offset = a.cfg ? batch * a.model_stride : 0;
  a.var_offset = learned ? a.numel : 0;
  a.guidance_scale = guidance.value_or(1.0);
  a.prediction = int(prediction);
  a.seed = uint64_t(seed);
  a.sample_offset = sample_offset;
  a.prev = output(p, sample, dt, true);
  a.x0 = output(p, sample, dt, write_x0);
}

}  // namespace

StepPlan plan_ddpm_step(const Tensor& model_output, const Tensor& sample, const Tensor& coefs,
                        const c10::optional<Tensor>& noise, int64_t seed, int64_t sample_offset, int64_t prediction,
                        int64_t variance_mode, c10::optional<double> clip_sample_range,
                        const c10::optional<Tensor>& threshold, c10::optional<double> guidance_scale,
                        bool write_x0) {
  TORCH_CHECK(variance_mode >= 0 && variance_mode <= FD_VAR_LEARNED_RANGE,
              "fastdiff_C::ddpm_step: variance_mode must be 0 (fixed), 1 (learned) or 2 (learned_range), got ",
              variance_mode);
  StepPlan p;
  plan_step_common(p, "ddpm_step", model_output, sample, coefs, noise, seed, sample_offset, prediction,
                   variance_mode != FD_VAR_FIXED, clip_sample_range, threshold, guidance_scale, write_x0);
  p.args.variance_mode = int(variance_mode);
  p.args.add_noise = 1;
  return p;
}

StepPlan plan_ddim_step(const Tensor& model_output, const Tensor& sample, const Tensor& coefs,
                        const c10::optional<Tensor>& noise, int64_t seed, int64_t sample_offset, int64_t prediction,
                        double eta, bool use_clipped_model_output, c10::optional<double> clip_sample_range,
                        const c10::optional<Tensor>& threshold, c10::optional<double> guidance_scale,
                        bool write_x0) {
  StepPlan p;
  plan_step_common(p, "ddim_step", model_output, sample, coefs, noise, seed, sample_offset, prediction, false,
                   clip_sample_range, threshold, guidance_scale, write_x0);
  p.args.eta = eta;
  p.args.use_clipped = use_clipped_model_output ? 1 : 0;
  p.args.add_noise = eta > 0.0 ? 1 : 0;  // DDIM: noise only when eta > 0
  return p;
}

QSamplePlan plan_q_sample(const Tensor& x0, const Tensor& timesteps, const Tensor& alphas_cumprod,
                          const c10::optional<Tensor>& noise, int64_t seed, int64_t sample_offset, bool write_noise,
                          bool write_v) {
  const char* op = "q_sample";
  check_float(op, "x0", x0);
  TORCH_CHECK(x0.dim() >= 1, "fastdiff_C::q_sample: x0 must have a batch dimension, got shape ", shape_str(x0));
  check_seed(op, seed, sample_offset);
  check_device(op, "timesteps", timesteps, x0);
  check_device(op, "alphas_cumprod", alphas_cumprod, x0);
  TORCH_CHECK(!timesteps.is_floating_point() && !timesteps.is_complex() && timesteps.numel() == x0.size(0),
              "fastdiff_C::q_sample: timesteps must be integers, one per sample (", x0.size(0), "), got ",
              timesteps.scalar_type(), " of shape ", shape_str(timesteps));
  TORCH_CHECK(alphas_cumprod.dim() == 1 && alphas_cumprod.numel() > 0 && alphas_cumprod.is_floating_point(),
              "fastdiff_C::q_sample: alphas_cumprod must be a non-empty 1-d float table, got ",
              alphas_cumprod.scalar_type(), " of shape ", shape_str(alphas_cumprod));
  if (noise.has_value()) {
    check_float(op, "noise", *noise);
    check_device(op, "noise", *noise, x0);
    TORCH_CHECK(noise->sizes() == x0.sizes(), "fastdiff_C::q_sample: noise must have x0's shape ", shape_str(x0),
                ", got ", shape_str(*noise));
  }
  QSamplePlan p;
  at::ScalarType dt = storage_dtype(x0, {noise.has_value() ? &*noise : nullptr});
  p.dtype = dtype_code(dt);
  FdQSampleArgs& a = p.args;
  a.x0 = input(p, x0, dt);
  a.noise = noise.has_value() ? input(p, *noise, dt) : nullptr;
  p.keep.push_back(timesteps.to(at::kLong).contiguous());
  a.timesteps = p.keep.back().const_data_ptr<int64_t>();
  p.keep.push_back(alphas_cumprod.to(at::kFloat).contiguous());  // the reference gathers from fp32
  a.alphas_cumprod = p.keep.back().const_data_ptr<float>();
  a.num_train_timesteps = alphas_cumprod.numel();
  a.batch = x0.size(0);
  a.numel = per_sample(x0);
  a.seed = uint64_t(seed);
  a.sample_offset = sample_offset;
  a.x_t = output(p, x0, dt, true);
  a.noise_out = output(p, x0, dt, write_noise);
  a.v_out = output(p, x0, dt, write_v);
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
  p.args.out = output(p, cond, dt, true);
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

std::tuple<Tensor, Tensor> finish2(OutputPlan& plan) {
  finish(plan);
  return {plan.outputs[0], plan.outputs[1]};
}

std::tuple<Tensor, Tensor, Tensor> finish3(OutputPlan& plan) {
  finish(plan);
  return {plan.outputs[0], plan.outputs[1], plan.outputs[2]};
}

}  // namespace fastdiff
