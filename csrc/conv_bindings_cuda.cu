// CUDA implementations of the fusedres_ext convolution ops (schemas in conv_bindings.cpp):
// check the arguments (naming the offending one), lay the operands out as the CUTLASS
// kernels want them (NHWC activations, KRSC filters: no copies when they already are),
// allocate outputs and workspaces from PyTorch's caching allocator, and launch on the
// current stream under a device guard. Nothing here synchronises the host, so the ops can
// be captured in CUDA graphs. A call the kernels do not support is an error: callers ask
// conv_cutlass_support first (fusedres/backends/cuda.py does).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "kernels/conv_cutlass.h"

namespace fusedres {
namespace {

#define CONV_CHECK_ARG(cond, op, name, ...) TORCH_CHECK(cond, op, ": ", name, " ", __VA_ARGS__)

// channels_last only when (strictly) channels_last, contiguous otherwise: the layout rule
// every fusedres primitive follows for its outputs
at::MemoryFormat layout_rule(const at::Tensor& t) {
  return (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous())
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

ConvDtype conv_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  CONV_CHECK_ARG(st == at::kHalf || st == at::kBFloat16, op, name, "must be float16 or bfloat16, got ", st);
  return st == at::kHalf ? ConvDtype::kFloat16 : ConvDtype::kBFloat16;
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  CONV_CHECK_ARG(t.dim() == 4, op, name, "must be 4-D, got shape ", t.sizes());
  CONV_CHECK_ARG(t.is_cuda(), op, name, "must be a CUDA tensor, got ", t.device());
  CONV_CHECK_ARG(t.device() == like.device(), op, name, "must be on ", like.device(), ", got ", t.device());
  CONV_CHECK_ARG(t.scalar_type() == like.scalar_type(), op, name, "must have dtype ", like.scalar_type(), ", got ",
                 t.scalar_type());
}

void check_pair(const char* op, const char* name, at::IntArrayRef v) {
  CONV_CHECK_ARG(v.size() == 2, op, name, "must have 2 entries, got ", v);
}

// NHWC in memory and 16-byte aligned (a no-op when it already is)
at::Tensor nhwc(const at::Tensor& t) {
  auto out = t.contiguous(at::MemoryFormat::ChannelsLast);
  if (reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 != 0) out = out.clone(at::MemoryFormat::ChannelsLast);
  return out;
}

// a per-channel vector in `dtype`, contiguous (fresh allocations are 256-byte aligned)
at::Tensor channel_vector(const char* op, const char* name, const at::Tensor& v, int64_t size, const at::Tensor& like,
                          at::ScalarType dtype) {
  CONV_CHECK_ARG(v.dim() == 1 && v.size(0) == size, op, name, "must be a 1-D tensor of ", size, " elements, got shape ",
                 v.sizes());
  CONV_CHECK_ARG(v.is_floating_point(), op, name, "must be a floating-point tensor, got ", v.scalar_type());
  CONV_CHECK_ARG(v.device() == like.device(), op, name, "must be on ", like.device(), ", got ", v.device());
  auto out = v.to(dtype).contiguous();
  if (reinterpret_cast<uintptr_t>(out.data_ptr()) % 32 != 0) out = out.clone();
  return out;
}

ConvGeometry geometry(const char* op, at::IntArrayRef x_shape, at::IntArrayRef w_shape, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  check_pair(op, "dilation", dilation);
  // groups as torch.nn.functional.conv2d infers them: C / (the weight's input channels)
  CONV_CHECK_ARG(w_shape[1] >= 1 && x_shape[1] % w_shape[1] == 0, op, "weight",
                 "must have a number of input channels that divides the input's ", x_shape[1], ", got shape ",
                 w_shape);
  const int64_t groups = x_shape[1] / w_shape[1];
  CONV_CHECK_ARG(w_shape[0] % groups == 0, op, "weight",
                 "must have a number of output channels divisible by groups = ", groups, ", got shape ", w_shape);
  ConvGeometry g;
  g.groups = groups;
  g.n = x_shape[0];
  g.c = x_shape[1];
  g.h = x_shape[2];
  g.w = x_shape[3];
  g.k = w_shape[0];
  g.r = w_shape[2];
  g.s = w_shape[3];
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  g.p = conv_out_size(g.h, g.pad_h, g.dil_h, g.r, g.stride_h);
  g.q = conv_out_size(g.w, g.pad_w, g.dil_w, g.s, g.stride_w);
  return g;
}

void require_supported(const char* op, ConvKind kind, ConvDtype dt, const ConvGeometry& g, const ConvCallFlags& f) {
  const char* why = conv_cutlass_unsupported(kind, dt, g, f);
  TORCH_CHECK(why == nullptr, op, ": not supported by the CUTLASS kernels (", why,
              "); check fusedres_ext::conv_cutlass_support first");
}

void check_status(const char* op, ConvStatus st) {
  if (st == ConvStatus::kOk) return;
  if (st == ConvStatus::kLaunchError) {
    TORCH_CHECK(false, op, ": ", conv_status_string(st), ": ", cudaGetErrorString(cudaGetLastError()));
  }
  TORCH_CHECK(false, op, ": ", conv_status_string(st));
}

// An output of logical shape `sizes` in memory format `fmt` that the kernel can write as
// NHWC: the output itself when its memory already is NHWC (always for channels_last, and for
// contiguous tensors whose spatial extent is 1x1), else an NHWC buffer to copy from.
struct NhwcOut {
  at::Tensor out, buf;
  NhwcOut(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat fmt) {
    out = at::empty(sizes, opts.memory_format(fmt));
    buf = out.is_contiguous(at::MemoryFormat::ChannelsLast) ? out
                                                            : at::empty(sizes, opts.memory_format(at::MemoryFormat::ChannelsLast));
  }
  at::Tensor finish() {
    if (!buf.is_same(out)) out.copy_(buf);
    return out;
  }
};

ConvFpropParams fprop_params(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             at::Tensor& xk, at::Tensor& wk, at::Tensor& sk, at::Tensor& tk) {
  check_tensor(op, "x", x, x);
  check_tensor(op, "weight", weight, x);
  ConvFpropParams p;
  p.dtype = conv_dtype(op, "x", x);
  p.g = geometry(op, x.sizes(), weight.sizes(), stride, padding, dilation);
  CONV_CHECK_ARG(in_scale.has_value() == in_shift.has_value(), op, "in_scale/in_shift", "must be given together");
  xk = nhwc(x);
  wk = nhwc(weight);
  p.x = xk.data_ptr();
  p.w = wk.data_ptr();
  if (in_scale.has_value()) {
    // the prologue runs in the storage type (CUTLASS's scale/bias fragments are 16-bit)
    sk = channel_vector(op, "in_scale", *in_scale, p.g.c, x, x.scalar_type());
    tk = channel_vector(op, "in_shift", *in_shift, p.g.c, x, x.scalar_type());
    p.in_scale = sk.data_ptr();
    p.in_shift = tk.data_ptr();
  }
  return p;
}

at::Tensor conv_bias_act_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& in_scale,
                              const std::optional<at::Tensor>& in_shift, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, bool hopper) {
  constexpr const char* op = "fusedres_ext::conv_bias_act_cutlass";
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xk, wk, sk, tk, bk, rk;
  ConvFpropParams p = fprop_params(op, x, weight, in_scale, in_shift, stride, padding, dilation, xk, wk, sk, tk);
  const ConvGeometry& g = p.g;
  if (bias.has_value() && g.groups == 1) {
    bk = channel_vector(op, "bias", *bias, g.k, x, at::kFloat);
    p.bias = bk.data_ptr<float>();
  } else if (bias.has_value()) {
    // the grouped kernel reads its bias as the epilogue's source tensor: storage dtype
    bk = channel_vector(op, "bias", *bias, g.k, x, x.scalar_type());
    p.bias_storage = bk.data_ptr();
  }
  if (residual.has_value()) {
    check_tensor(op, "residual", *residual, x);
    CONV_CHECK_ARG(residual->sizes() == at::IntArrayRef({g.n, g.k, g.p, g.q}), op, "residual",
                   "must have the output's shape [", g.n, ", ", g.k, ", ", g.p, ", ", g.q, "], got ",
                   residual->sizes());
    rk = nhwc(*residual);
    p.residual = rk.data_ptr();
  }
  p.relu = relu;
  p.hopper = hopper;
  ConvCallFlags f;
  f.has_bias = bias.has_value();
  f.has_residual = residual.has_value();
  f.input_relu = in_scale.has_value();
  require_supported(op, in_scale.has_value() ? ConvKind::kFpropPrologue : ConvKind::kFprop, p.dtype, g, f);
  NhwcOut y({g.n, g.k, g.p, g.q}, x.options(), layout_rule(x));
  p.y = y.buf.data_ptr();
  check_status(op, conv_fprop_cutlass(p, c10::cuda::getCurrentCUDAStream().stream()));
  return y.finish();
}

std::tuple<at::Tensor, at::Tensor> conv_stats_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& in_scale,
                                                   const std::optional<at::Tensor>& in_shift, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation, bool hopper) {
  constexpr const char* op = "fusedres_ext::conv_stats_cutlass";
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xk, wk, sk, tk;
  ConvFpropParams p = fprop_params(op, x, weight, in_scale, in_shift, stride, padding, dilation, xk, wk, sk, tk);
  const ConvGeometry& g = p.g;
  p.hopper = hopper;
  ConvCallFlags f;
  f.input_relu = in_scale.has_value();
  require_supported(op, in_scale.has_value() ? ConvKind::kFpropPrologue : ConvKind::kFprop, p.dtype, g, f);
  NhwcOut y({g.n, g.k, g.p, g.q}, x.options(), layout_rule(x));
  p.y = y.buf.data_ptr();
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check_status(op, conv_fprop_cutlass(p, stream));
  const int64_t m = g.n * g.p * g.q;
  auto partials = at::empty({1, 3, g.k}, x.options().dtype(at::kFloat));
  auto ws = at::empty({static_cast<int64_t>(conv_stats_workspace_bytes(m, g.k))}, x.options().dtype(at::kByte));
  check_status(op, conv_stats_nhwc(p.dtype, p.y, m, g.k, partials.data_ptr<float>(), ws.data_ptr(), stream));
  return {y.finish(), partials};
}

at::Tensor conv_dgrad_cuda(const at::Tensor& dy, const at::Tensor& weight, at::IntArrayRef input_shape,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           const std::optional<at::Tensor>& addend) {
  constexpr const char* op = "fusedres_ext::conv_dgrad_cutlass";
  const c10::cuda::CUDAGuard guard(dy.device());
  check_tensor(op, "dy", dy, dy);
  check_tensor(op, "weight", weight, dy);
  CONV_CHECK_ARG(input_shape.size() == 4, op, "input_shape", "must have 4 entries (N, C, H, W), got ", input_shape);
  ConvDgradParams p;
  p.dtype = conv_dtype(op, "dy", dy);
  p.g = geometry(op, input_shape, weight.sizes(), stride, padding, dilation);
  const ConvGeometry& g = p.g;
  CONV_CHECK_ARG(dy.sizes() == at::IntArrayRef({g.n, g.k, g.p, g.q}), op, "dy", "must have shape [", g.n, ", ", g.k,
                 ", ", g.p, ", ", g.q, "] for this input_shape and weight, got ", dy.sizes());
  ConvCallFlags f;
  f.has_residual = addend.has_value();
  require_supported(op, ConvKind::kDgrad, p.dtype, g, f);
  const at::Tensor dyk = nhwc(dy), wk = nhwc(weight);
  p.dy = dyk.data_ptr();
  p.w = wk.data_ptr();
  at::Tensor ak;
  if (addend.has_value()) {
    check_tensor(op, "addend", *addend, dy);
    CONV_CHECK_ARG(addend->sizes() == input_shape, op, "addend", "must have input_shape ", input_shape, ", got ",
                   addend->sizes());
    ak = nhwc(*addend);
    p.addend = ak.data_ptr();
  }
  NhwcOut dx(input_shape, dy.options(), layout_rule(dy));
  p.dx = dx.buf.data_ptr();
  check_status(op, conv_dgrad_cutlass(p, c10::cuda::getCurrentCUDAStream().stream()));
  return dx.finish();
}

at::Tensor conv_wgrad_cuda(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& in_scale,
                           const std::optional<at::Tensor>& in_shift, at::IntArrayRef weight_shape,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "fusedres_ext::conv_wgrad_cutlass";
  const c10::cuda::CUDAGuard guard(dy.device());
  check_tensor(op, "dy", dy, dy);
  check_tensor(op, "x", x, dy);
  CONV_CHECK_ARG(weight_shape.size() == 4, op, "weight_shape", "must have 4 entries (K, C, R, S), got ", weight_shape);
  CONV_CHECK_ARG(in_scale.has_value() == in_shift.has_value(), op, "in_scale/in_shift", "must be given together");
  ConvWgradParams p;
  p.dtype = conv_dtype(op, "dy", dy);
  p.g = geometry(op, x.sizes(), weight_shape, stride, padding, dilation);
  const ConvGeometry& g = p.g;
  CONV_CHECK_ARG(dy.sizes() == at::IntArrayRef({g.n, g.k, g.p, g.q}), op, "dy", "must have shape [", g.n, ", ", g.k,
                 ", ", g.p, ", ", g.q, "] for this x and weight_shape, got ", dy.sizes());
  ConvCallFlags f;
  f.input_relu = in_scale.has_value();
  require_supported(op, in_scale.has_value() ? ConvKind::kWgradPrologue : ConvKind::kWgrad, p.dtype, g, f);
  const at::Tensor dyk = nhwc(dy), xk = nhwc(x);
  at::Tensor sk, tk;
  if (in_scale.has_value()) {
    sk = channel_vector(op, "in_scale", *in_scale, g.c, dy, dy.scalar_type());
    tk = channel_vector(op, "in_shift", *in_shift, g.c, dy, dy.scalar_type());
    p.in_scale = sk.data_ptr();
    p.in_shift = tk.data_ptr();
  }
  p.dy = dyk.data_ptr();
  p.x = xk.data_ptr();
  // PyTorch's weight gradient is contiguous [K, C, R, S]: the slice reduction writes it so
  auto dw = at::empty(weight_shape, dy.options());
  p.dw = dw.data_ptr();
  p.dw_kcrs = true;
  p.split_k = conv_wgrad_split_k(g);
  auto ws = at::empty({static_cast<int64_t>(conv_wgrad_workspace_bytes(g, p.split_k))}, dy.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  check_status(op, conv_wgrad_cutlass(p, c10::cuda::getCurrentCUDAStream().stream()));
  return dw;
}

#undef CONV_CHECK_ARG

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres_ext, CUDA, m) {
  m.impl("conv_bias_act_cutlass", &fusedres::conv_bias_act_cuda);
  m.impl("conv_stats_cutlass", &fusedres::conv_stats_cuda);
  m.impl("conv_dgrad_cutlass", &fusedres::conv_dgrad_cuda);
  m.impl("conv_wgrad_cutlass", &fusedres::conv_wgrad_cuda);
}
