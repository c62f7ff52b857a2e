// fusedres_ext convolution ops: the schemas (in every build, so CPU builds know the ops and
// torch.compile can trace them with their Python fakes) and two device-independent ops:
//
//   conv_cutlass_support(kind, dtype, x_shape, w_shape, stride, padding, dilation, groups,
//                        bias, residual, input_relu, nhwc, same_dtype) -> str
//       "" when the CUTLASS kernel of `kind` takes the call, else the reason it does not:
//       kernels/conv_support.h's predicate, the one place that decides, callable without a
//       GPU. kind: fprop | fprop_prologue | dgrad | wgrad | wgrad_prologue. x_shape is the
//       logical [N, C, H, W] input, w_shape [K, C/groups, R, S].
//   conv_cutlass_info() -> str
//       a description of the compiled CUTLASS kernels, "" when built without them.
//
// The tensor ops (CUDA only, conv_bindings_cuda.cu) are documented in fusedres/backends/_cutlass.py.
#include <torch/library.h>

#include <string>

#include "kernels/conv_support.h"

#ifdef FUSEDRES_WITH_CUTLASS
#include "kernels/conv_cutlass.h"
#endif

namespace fusedres {
namespace {

ConvKind conv_kind_of(const std::string& kind) {
  if (kind == "fprop") return ConvKind::kFprop;
  if (kind == "fprop_prologue") return ConvKind::kFpropPrologue;
  if (kind == "dgrad") return ConvKind::kDgrad;
  if (kind == "wgrad") return ConvKind::kWgrad;
  if (kind == "wgrad_prologue") return ConvKind::kWgradPrologue;
  TORCH_CHECK(false, "fusedres_ext::conv_cutlass_support: kind must be one of fprop, fprop_prologue, dgrad, wgrad, "
              "wgrad_prologue, got '", kind, "'");
}

std::string conv_cutlass_support_op(const std::string& kind, at::ScalarType dtype, at::IntArrayRef x_shape,
                                    at::IntArrayRef w_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups, bool bias, bool residual, bool input_relu,
                                    bool nhwc, bool same_dtype) {
  constexpr const char* op = "fusedres_ext::conv_cutlass_support";
  TORCH_CHECK(x_shape.size() == 4, op, ": x_shape must have 4 entries (N, C, H, W), got ", x_shape);
  TORCH_CHECK(w_shape.size() == 4, op, ": w_shape must have 4 entries (K, C/groups, R, S), got ", w_shape);
  for (auto [name, v] : {std::pair<const char*, at::IntArrayRef>{"stride", stride}, {"padding", padding},
                         {"dilation", dilation}})
    TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 entries, got ", v);
  ConvGeometry g;
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
  g.groups = groups;
  g.p = conv_out_size(g.h, g.pad_h, g.dil_h, g.r, g.stride_h);
  g.q = conv_out_size(g.w, g.pad_w, g.dil_w, g.s, g.stride_w);
  if (groups >= 1 && w_shape[1] * groups != g.c) return "weight does not match the input channels";
  ConvCallFlags f;
  f.has_bias = bias;
  f.has_residual = residual;
  f.input_relu = input_relu;
  f.nhwc = nhwc;
  f.same_dtype = same_dtype;
  const ConvDtype dt = dtype == at::kHalf       ? ConvDtype::kFloat16
                       : dtype == at::kBFloat16 ? ConvDtype::kBFloat16
                                                : ConvDtype::kOther;
  const char* why = conv_cutlass_unsupported(conv_kind_of(kind), dt, g, f);
  return why == nullptr ? std::string() : std::string(why);
}

std::string conv_cutlass_info_op() {
#ifdef FUSEDRES_WITH_CUTLASS
  return conv_cutlass_description();
#else
  return std::string();
#endif
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_FRAGMENT(fusedres_ext, m) {
  m.def(
      "conv_cutlass_support(str kind, ScalarType dtype, int[] x_shape, int[] w_shape, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool bias, bool residual, bool input_relu, bool nhwc, bool same_dtype) -> str",
      &fusedres::conv_cutlass_support_op);
  m.def("conv_cutlass_info() -> str", &fusedres::conv_cutlass_info_op);
  m.def(
      "conv_bias_act_cutlass(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor? in_scale, "
      "Tensor? in_shift, int[] stride, int[] padding, int[] dilation, bool relu, bool hopper=False) -> Tensor");
  m.def(
      "conv_stats_cutlass(Tensor x, Tensor weight, Tensor? in_scale, Tensor? in_shift, int[] stride, int[] padding, "
      "int[] dilation, bool hopper=False) -> (Tensor, Tensor)");
  m.def(
      "conv_dgrad_cutlass(Tensor dy, Tensor weight, int[] input_shape, int[] stride, int[] padding, int[] dilation, "
      "Tensor? addend) -> Tensor");
  m.def(
      "conv_wgrad_cutlass(Tensor dy, Tensor x, Tensor? in_scale, Tensor? in_shift, int[] weight_shape, int[] stride, "
      "int[] padding, int[] dilation) -> Tensor");
}
