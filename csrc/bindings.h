// Shared validation for the fusedres_ext op bindings (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>

#include "kernels/bn_kernels.h"

#define FUSEDRES_CHECK_ARG(cond, op, name, ...) TORCH_CHECK(cond, op, ": ", name, " ", __VA_ARGS__)

namespace fusedres {

// The layout rule every fusedres primitive follows: channels_last only when the tensor is
// (strictly) channels_last, contiguous otherwise.
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  return (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous())
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline at::ScalarType stat_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_vec(const char* op, const char* name, const at::Tensor& v, int64_t size, const at::Tensor& like) {
  FUSEDRES_CHECK_ARG(v.dim() == 1 && v.size(0) == size, op, name, "must be a 1-D tensor of ", size,
                     " elements, got shape ", v.sizes());
  FUSEDRES_CHECK_ARG(v.device() == like.device(), op, name, "must be on ", like.device(), ", got ", v.device());
}

// Per-channel / per-sample vectors of bn_add_act: float32 for every y dtype; float64 is
// also accepted when y is float64 (then the math runs in float64). Returned contiguous in
// the compute dtype.
inline at::Tensor vec_arg(const char* op, const char* name, const at::Tensor& v, int64_t size, const at::Tensor& y) {
  check_vec(op, name, v, size, y);
  const bool y64 = y.scalar_type() == at::kDouble;
  if (y64) {
    FUSEDRES_CHECK_ARG(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble, op, name,
                       "must be Float or Double (y is Double), got ", v.scalar_type());
  } else {
    FUSEDRES_CHECK_ARG(v.scalar_type() == at::kFloat, op, name, "must be Float, got ", v.scalar_type());
  }
  return v.to(stat_type(y.scalar_type())).contiguous();
}

struct BnAddActPrepared {
  at::Tensor y, residual, out, scale, shift, res_scale, res_shift, sample_scale;
  Layout layout;
  int64_t n, c, hw;
};

inline BnAddActPrepared prepare_bn_add_act(const char* op, const at::Tensor& y, const at::Tensor& scale,
                                           const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                                           const std::optional<at::Tensor>& res_scale,
                                           const std::optional<at::Tensor>& res_shift,
                                           const std::optional<at::Tensor>& sample_scale) {
  FUSEDRES_CHECK_ARG(y.dim() == 4, op, "y", "must be 4-D (N, C, H, W), got shape ", y.sizes());
  BnAddActPrepared p;
  p.n = y.size(0);
  p.c = y.size(1);
  p.hw = y.size(2) * y.size(3);
  const auto fmt = layout_of(y);
  p.layout = fmt == at::MemoryFormat::ChannelsLast ? Layout::NHWC : Layout::NCHW;
  p.y = y.contiguous(fmt);
  p.scale = vec_arg(op, "scale", scale, p.c, y);
  p.shift = vec_arg(op, "shift", shift, p.c, y);
  FUSEDRES_CHECK_ARG(res_scale.has_value() == res_shift.has_value(), op, "res_scale/res_shift",
                     "must be given together");
  if (res_scale.has_value()) {
    FUSEDRES_CHECK_ARG(residual.has_value(), op, "res_scale", "needs a residual");
    p.res_scale = vec_arg(op, "res_scale", *res_scale, p.c, y);
    p.res_shift = vec_arg(op, "res_shift", *res_shift, p.c, y);
  }
  if (residual.has_value()) {
    const auto& r = *residual;
    FUSEDRES_CHECK_ARG(r.sizes() == y.sizes(), op, "residual", "must have the same shape as y (", y.sizes(),
                       "), got ", r.sizes());
    FUSEDRES_CHECK_ARG(r.scalar_type() == y.scalar_type(), op, "residual", "must have y's dtype (",
                       y.scalar_type(), "), got ", r.scalar_type());
    FUSEDRES_CHECK_ARG(r.device() == y.device(), op, "residual", "must be on ", y.device(), ", got ", r.device());
    p.residual = r.contiguous(fmt);
  }
  if (sample_scale.has_value()) {
    p.sample_scale = vec_arg(op, "sample_scale", *sample_scale, p.n, y);
  }
  p.out = at::empty(y.sizes(), y.options().memory_format(fmt));
  return p;
}

template <typename S>
BnAddActParams<S> params_of(const BnAddActPrepared& p, bool relu) {
  BnAddActParams<S> k;
  k.n = p.n;
  k.c = p.c;
  k.hw = p.hw;
  k.layout = p.layout;
  k.scale = p.scale.data_ptr<S>();
  k.shift = p.shift.data_ptr<S>();
  k.res_scale = p.res_scale.defined() ? p.res_scale.data_ptr<S>() : nullptr;
  k.res_shift = p.res_shift.defined() ? p.res_shift.data_ptr<S>() : nullptr;
  k.sample_scale = p.sample_scale.defined() ? p.sample_scale.data_ptr<S>() : nullptr;
  k.relu = relu;
  return k;
}

struct BnFinalizePrepared {
  at::Tensor partials, gamma, beta, rm, rv, mean, invstd, scale, shift;
  int64_t tiles, c;
};

inline BnFinalizePrepared prepare_bn_finalize(const char* op, const at::Tensor& partials, const at::Tensor& gamma,
                                              const at::Tensor& beta, const std::optional<at::Tensor>& running_mean,
                                              const std::optional<at::Tensor>& running_var) {
  FUSEDRES_CHECK_ARG(partials.dim() == 3 && partials.size(1) == 3, op, "partials",
                     "must have shape [T, 3, C], got ", partials.sizes());
  const auto st = partials.scalar_type();
  FUSEDRES_CHECK_ARG(st == at::kFloat || st == at::kDouble, op, "partials", "must be float32 or float64, got ", st);
  BnFinalizePrepared p;
  p.tiles = partials.size(0);
  p.c = partials.size(2);
  FUSEDRES_CHECK_ARG(p.tiles > 0, op, "partials", "must hold at least one tile");
  p.partials = partials.contiguous();
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"gamma", &gamma}, {"beta", &beta}}) {
    FUSEDRES_CHECK_ARG(t->dim() == 1 && t->size(0) == p.c, op, name, "must be a 1-D tensor of ", p.c,
                       " elements, got shape ", t->sizes());
    FUSEDRES_CHECK_ARG(t->is_floating_point(), op, name, "must be a floating-point tensor, got ", t->scalar_type());
    FUSEDRES_CHECK_ARG(t->device() == partials.device(), op, name, "must be on ", partials.device(), ", got ",
                       t->device());
  }
  p.gamma = gamma.to(st).contiguous();
  p.beta = beta.to(st).contiguous();
  FUSEDRES_CHECK_ARG(running_mean.has_value() == running_var.has_value(), op, "running_mean/running_var",
                     "must be given together");
  if (running_mean.has_value()) {
    for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"running_mean", &*running_mean},
                           {"running_var", &*running_var}}) {
      FUSEDRES_CHECK_ARG(t->dim() == 1 && t->size(0) == p.c, op, name, "must be a 1-D tensor of ", p.c,
                         " elements, got shape ", t->sizes());
      FUSEDRES_CHECK_ARG(t->is_floating_point(), op, name, "must be a floating-point tensor, got ",
                         t->scalar_type());
      FUSEDRES_CHECK_ARG(t->device() == partials.device(), op, name, "must be on ", partials.device(), ", got ",
                         t->device());
    }
    // work on contiguous copies in the statistics dtype when needed; copied back after the kernel
    p.rm = (running_mean->scalar_type() == st && running_mean->is_contiguous()) ? *running_mean
                                                                                 : running_mean->to(st).contiguous();
    p.rv = (running_var->scalar_type() == st && running_var->is_contiguous()) ? *running_var
                                                                               : running_var->to(st).contiguous();
  }
  auto opts = partials.options();
  p.mean = at::empty({p.c}, opts);
  p.invstd = at::empty({p.c}, opts);
  p.scale = at::empty({p.c}, opts);
  p.shift = at::empty({p.c}, opts);
  return p;
}

template <typename S>
BnFinalizeParams<S> params_of(const BnFinalizePrepared& p, double momentum, double eps) {
  BnFinalizeParams<S> k;
  k.tiles = p.tiles;
  k.c = p.c;
  k.partials = p.partials.data_ptr<S>();
  k.gamma = p.gamma.data_ptr<S>();
  k.beta = p.beta.data_ptr<S>();
  k.running_mean = p.rm.defined() ? p.rm.data_ptr<S>() : nullptr;
  k.running_var = p.rv.defined() ? p.rv.data_ptr<S>() : nullptr;
  k.momentum = momentum;
  k.eps = eps;
  k.mean = p.mean.data_ptr<S>();
  k.invstd = p.invstd.data_ptr<S>();
  k.scale = p.scale.data_ptr<S>();
  k.shift = p.shift.data_ptr<S>();
  return k;
}

inline void write_back_running(const BnFinalizePrepared& p, const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var) {
  if (!running_mean.has_value()) return;
  if (!p.rm.is_same(*running_mean)) running_mean->copy_(p.rm);
  if (!p.rv.is_same(*running_var)) running_var->copy_(p.rv);
}

// --------------------------------------------------------------- reductions, backward

inline void check_storage(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  FUSEDRES_CHECK_ARG(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op, name,
                     "must be float32, float64, float16 or bfloat16, got ", dt);
}

// t must have ref's shape, dtype and device.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  FUSEDRES_CHECK_ARG(t.sizes() == ref.sizes(), op, name, "must have the same shape as ", ref_name, " (", ref.sizes(),
                     "), got ", t.sizes());
  FUSEDRES_CHECK_ARG(t.scalar_type() == ref.scalar_type(), op, name, "must have ", ref_name, "'s dtype (",
                     ref.scalar_type(), "), got ", t.scalar_type());
  FUSEDRES_CHECK_ARG(t.device() == ref.device(), op, name, "must be on ", ref.device(), ", got ", t.device());
}

struct BatchStatsPrepared {
  at::Tensor x, partials;
  Layout layout;
  int64_t n, c, hw, tiles;
};

// partials [tiles, 3, C] in the statistics dtype (float32, float64 for float64 x).
inline BatchStatsPrepared prepare_batch_stats(const char* op, const at::Tensor& x, int64_t tiles) {
  FUSEDRES_CHECK_ARG(x.dim() == 4, op, "x", "must be 4-D (N, C, H, W), got shape ", x.sizes());
  check_storage(op, "x", x);
  FUSEDRES_CHECK_ARG(tiles >= 1, op, "tiles", "must be at least 1, got ", tiles);
  BatchStatsPrepared p;
  p.n = x.size(0);
  p.c = x.size(1);
  p.hw = x.size(2) * x.size(3);
  p.tiles = tiles;
  const auto fmt = layout_of(x);
  p.layout = fmt == at::MemoryFormat::ChannelsLast ? Layout::NHWC : Layout::NCHW;
  p.x = x.contiguous(fmt);
  p.partials = at::empty({tiles, 3, p.c}, x.options().dtype(stat_type(x.scalar_type())));
  return p;
}

template <typename S>
BatchStatsParams<S> params_of(const BatchStatsPrepared& p) {
  BatchStatsParams<S> k;
  k.n = p.n;
  k.c = p.c;
  k.hw = p.hw;
  k.layout = p.layout;
  k.tiles = p.tiles;
  k.partials = p.partials.data_ptr<S>();
  return k;
}

struct BnBackwardPrepared {
  at::Tensor dout, y, out, addend, grad_out, mean, invstd, scale, shift, sample_scale, coefs;
  Layout layout;
  int64_t n, c, hw;
};

// dout (named dout_name in errors) and out (when given) in y's layout; `out` is only kept when relu (it is only read
// for the ReLU mask).
inline BnBackwardPrepared prepare_bn_elementwise(const char* op, const char* dout_name, const at::Tensor& dout,
                                                 const at::Tensor& y, const std::optional<at::Tensor>& out,
                                                 bool relu) {
  FUSEDRES_CHECK_ARG(y.dim() == 4, op, "y", "must be 4-D (N, C, H, W), got shape ", y.sizes());
  check_storage(op, "y", y);
  check_like(op, dout_name, dout, "y", y);
  BnBackwardPrepared p;
  p.n = y.size(0);
  p.c = y.size(1);
  p.hw = y.size(2) * y.size(3);
  const auto fmt = layout_of(y);
  p.layout = fmt == at::MemoryFormat::ChannelsLast ? Layout::NHWC : Layout::NCHW;
  p.y = y.contiguous(fmt);
  p.dout = dout.contiguous(fmt);
  if (out.has_value()) {
    check_like(op, "out", *out, "y", y);
    if (relu) p.out = out->contiguous(fmt);
  }
  return p;
}

// bn_backward_reduce / bn_backward_apply: the elementwise operands above; per-channel and
// per-sample vectors as vec_arg.
inline BnBackwardPrepared prepare_bn_backward(const char* op, const at::Tensor& dout, const at::Tensor& y,
                                              const at::Tensor& mean, const at::Tensor& invstd,
                                              const at::Tensor& scale, const at::Tensor& shift,
                                              const std::optional<at::Tensor>& out, bool relu,
                                              const std::optional<at::Tensor>& sample_scale) {
  auto p = prepare_bn_elementwise(op, "dout", dout, y, out, relu);
  p.mean = vec_arg(op, "mean", mean, p.c, y);
  p.invstd = vec_arg(op, "invstd", invstd, p.c, y);
  p.scale = vec_arg(op, "scale", scale, p.c, y);
  p.shift = vec_arg(op, "shift", shift, p.c, y);
  if (sample_scale.has_value()) p.sample_scale = vec_arg(op, "sample_scale", *sample_scale, p.n, y);
  return p;
}

// bn_backward_apply's addend (when given): y's shape, dtype and device, stored in y's layout.
inline void prepare_addend(const char* op, BnBackwardPrepared& p, const std::optional<at::Tensor>& addend,
                           const at::Tensor& y) {
  if (!addend.has_value()) return;
  check_like(op, "addend", *addend, "y", y);
  p.addend = addend->contiguous(p.layout == Layout::NHWC ? at::MemoryFormat::ChannelsLast
                                                         : at::MemoryFormat::Contiguous);
}

// bn_backward_apply's grad_out (when given): written in place, so y's shape, dtype and
// device, and dense in y's layout (as torch.empty_like(y) makes it).
inline void prepare_grad_out(const char* op, BnBackwardPrepared& p, const std::optional<at::Tensor>& grad_out,
                             const at::Tensor& y) {
  if (!grad_out.has_value()) return;
  check_like(op, "grad_out", *grad_out, "y", y);
  const auto fmt = p.layout == Layout::NHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  FUSEDRES_CHECK_ARG(grad_out->is_contiguous(fmt), op, "grad_out", "must be dense in y's memory format (",
                     fmt, "), got strides ", grad_out->strides());
  p.grad_out = *grad_out;
}

// bn_apply_relu (the BatchNorm+ReLU backward's apply from precomputed coefficients, the
// gradient dh of the BatchNorm output's consumer as dout): scale/shift as vec_arg, coefs
// [3, C] (A, B, C of dy = A*g + B*y + C) in the statistics dtype.
inline BnBackwardPrepared prepare_bn_apply_relu(const char* op, const at::Tensor& dh, const at::Tensor& y,
                                                const at::Tensor& scale, const at::Tensor& shift,
                                                const at::Tensor& coefs) {
  auto p = prepare_bn_elementwise(op, "dh", dh, y, std::nullopt, true);
  p.scale = vec_arg(op, "scale", scale, p.c, y);
  p.shift = vec_arg(op, "shift", shift, p.c, y);
  FUSEDRES_CHECK_ARG(coefs.dim() == 2 && coefs.size(0) == 3 && coefs.size(1) == p.c, op, "coefs",
                     "must have shape [3, ", p.c, "], got ", coefs.sizes());
  FUSEDRES_CHECK_ARG(coefs.device() == y.device(), op, "coefs", "must be on ", y.device(), ", got ",
                     coefs.device());
  FUSEDRES_CHECK_ARG(coefs.scalar_type() == stat_type(y.scalar_type()), op, "coefs", "must be ",
                     stat_type(y.scalar_type()), " (the statistics dtype of ", y.scalar_type(), "), got ",
                     coefs.scalar_type());
  p.coefs = coefs.contiguous();
  return p;
}

template <typename S>
BnBackwardParams<S> params_of(const BnBackwardPrepared& p, bool relu) {
  BnBackwardParams<S> k;
  k.n = p.n;
  k.c = p.c;
  k.hw = p.hw;
  k.layout = p.layout;
  k.mean = p.mean.defined() ? p.mean.data_ptr<S>() : nullptr;
  k.invstd = p.invstd.defined() ? p.invstd.data_ptr<S>() : nullptr;
  k.scale = p.scale.data_ptr<S>();
  k.shift = p.shift.data_ptr<S>();
  k.sample_scale = p.sample_scale.defined() ? p.sample_scale.data_ptr<S>() : nullptr;
  k.coefs = p.coefs.defined() ? p.coefs.data_ptr<S>() : nullptr;
  k.relu = relu;
  return k;
}

struct ActGradPrepared {
  at::Tensor dout, out, dx;
};

// Any shape; dout's layout rule (channels_last when dout strictly is) for out and dx.
inline ActGradPrepared prepare_act_grad(const char* op, const at::Tensor& dout, const at::Tensor& out) {
  check_storage(op, "dout", dout);
  check_like(op, "out", out, "dout", dout);
  const auto fmt = layout_of(dout);
  ActGradPrepared p;
  p.dout = dout.contiguous(fmt);
  p.out = out.contiguous(fmt);
  p.dx = at::empty(dout.sizes(), dout.options().memory_format(fmt));
  return p;
}

// Storage type T and compute type S of a (validated) dtype, as a tag for generic lambdas:
// f(StorageTag<T, S>{}). Half16/BF16 name the 16-bit storage types of the caller's kernels.
template <typename T_, typename S_>
struct StorageTag {
  using T = T_;
  using S = S_;
};

template <typename Half16, typename BF16, typename F>
void dispatch_storage(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat:
      f(StorageTag<float, float>{});
      break;
    case at::kDouble:
      f(StorageTag<double, double>{});
      break;
    case at::kHalf:
      static_assert(sizeof(Half16) == sizeof(at::Half), "16-bit storage types share c10::Half's layout");
      f(StorageTag<Half16, float>{});
      break;
    case at::kBFloat16:
      static_assert(sizeof(BF16) == sizeof(at::BFloat16), "16-bit storage types share c10::BFloat16's layout");
      f(StorageTag<BF16, float>{});
      break;
    default:
      TORCH_CHECK(false, "fusedres: unsupported dtype ", dt);
  }
}

}  // namespace fusedres
