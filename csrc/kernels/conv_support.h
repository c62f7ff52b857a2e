// Which convolutions the CUTLASS kernels of fusedres take: the single support decision,
// shared by the launchers (csrc/kernels/conv_cutlass.cu), the bindings and, through the
// CPU-callable op fusedres_ext::conv_cutlass_support, the Python backend and its tests.
//
// Plain C++ (no CUDA, no CUTLASS, no torch), so it compiles into every build and answers on
// machines without a GPU. It is deliberately stricter than CUTLASS's own can_implement():
// a shape it accepts must also pass can_implement() of the kernel that runs it (checked on
// the host by csrc/tests/test_conv_cuda.cu for a sweep of shapes).
//
// Geometry: x [N, H, W, C] (NHWC), w [K, R, S, C/groups] (KRSC), y [N, P, Q, K] (NHWC).
#pragma once

#include <cstdint>

namespace fusedres {

// The five kernel families. Prologue variants apply relu(x*scale[c] + shift[c]) to the
// activation operand while loading it (the previous BatchNorm + ReLU).
enum class ConvKind : int {
  kFprop = 0,          // y = act(conv(x, w) + bias[k] + residual)  (broadcast epilogue)
  kFpropPrologue = 1,  // y = act(conv(relu(x*s + t), w) + residual) (mainloop fusion)
  kDgrad = 2,          // dx = conv_transpose(dy, w)
  kWgrad = 3,          // dw = sum dy (x) x
  kWgradPrologue = 4,  // dw = sum dy (x) relu(x*s + t)              (mainloop fusion)
};

enum class ConvDtype : int { kFloat16 = 0, kBFloat16 = 1, kOther = 2 };

struct ConvGeometry {
  int64_t n = 0, h = 0, w = 0, c = 0;  // input
  int64_t k = 0, r = 0, s = 0;         // filter (K output channels)
  int64_t p = 0, q = 0;                // output spatial size
  int64_t pad_h = 0, pad_w = 0, stride_h = 1, stride_w = 1, dil_h = 1, dil_w = 1, groups = 1;
};

// Output size of a convolution along one dimension (PyTorch's formula); < 1 if empty.
inline int64_t conv_out_size(int64_t in, int64_t pad, int64_t dil, int64_t ker, int64_t stride) {
  const int64_t span = in + 2 * pad - dil * (ker - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// Properties of the call that are not geometry. Every flag must hold for the kernel to run.
struct ConvCallFlags {
  bool has_bias = false;     // fprop: a per-channel bias (folded BatchNorm)
  bool has_residual = false; // fprop: a residual added before the ReLU; dgrad: an addend of dx
  bool input_relu = false;   // a ReLU on the input: required by the prologue kinds, refused by the others
  bool nhwc = true;          // every activation-like operand is channels_last (NHWC in memory)
  bool same_dtype = true;    // weight / residual / second operand share the activation dtype
};

// Channels are moved in 128-bit accesses: 8 elements of a 16-bit type.
constexpr int64_t kConvChannelAlign = 8;
// Tile extent along the GEMM N dimension; bounds the CUDA grid's y extent.
constexpr int64_t kConvTileN = 128;
// Grouped forward (conv_fprop_group.cuh): one CTA computes a 64-column tile that holds
// 64 / (K/groups) whole groups, stepping through each group's reduction in slices of 32
// input channels. A slice must not run into the next group's channels (those would be
// multiplied by zeros, which turns an Inf there into NaN here), hence C/groups a multiple of
// 32; K/groups must divide the tile.
constexpr int64_t kConvGroupTileN = 64;
constexpr int64_t kConvGroupTileK = 32;

// nullptr when the CUTLASS kernel of `kind` takes this call; otherwise why not (a static
// string, for messages and tests).
inline const char* conv_cutlass_unsupported(ConvKind kind, ConvDtype dtype, const ConvGeometry& g,
                                            const ConvCallFlags& f) {
  if (dtype == ConvDtype::kOther) return "dtype is not float16 or bfloat16";
  if (!f.same_dtype) return "operands of different dtypes";
  if (!f.nhwc) return "activations are not channels_last";
  if (g.groups < 1) return "groups must be positive";
  if (g.groups > 1) {
    if (kind != ConvKind::kFprop) return "grouped convolution other than the forward without prologue";
    if (g.c % g.groups != 0 || g.k % g.groups != 0) return "grouped convolution: channels not divisible by groups";
    if (f.has_residual) return "grouped convolution with a residual";
    if ((g.c / g.groups) % kConvGroupTileK != 0)
      return "grouped convolution: input channels per group not a multiple of 32";
    const int64_t kpg = g.k / g.groups;
    if (kpg % kConvChannelAlign != 0 || kConvGroupTileN % kpg != 0)
      return "grouped convolution: output channels per group not 8, 16, 32 or 64";
    if ((g.k + kConvGroupTileN - 1) / kConvGroupTileN > 65535) return "too many tiles along the GEMM N dimension";
  }
  if (g.n < 1 || g.h < 1 || g.w < 1 || g.c < 1 || g.k < 1 || g.r < 1 || g.s < 1) return "empty tensor";
  if (g.stride_h < 1 || g.stride_w < 1 || g.dil_h < 1 || g.dil_w < 1 || g.pad_h < 0 || g.pad_w < 0)
    return "invalid stride, dilation or padding";
  if (g.p != conv_out_size(g.h, g.pad_h, g.dil_h, g.r, g.stride_h) ||
      g.q != conv_out_size(g.w, g.pad_w, g.dil_w, g.s, g.stride_w) || g.p < 1 || g.q < 1)
    return "inconsistent or empty output size";
  if (g.c % kConvChannelAlign != 0 || g.k % kConvChannelAlign != 0)
    return "channels not a multiple of 8 (128-bit accesses)";
  if (g.r > 32 || g.s > 32) return "filter larger than 32x32";
  // CUTLASS's 32-bit offset limits, in bytes of 16-bit elements
  const int64_t lim = (int64_t(1) << 31) / 2;
  if (g.n * g.h * g.w * g.c >= lim || g.k * g.r * g.s * g.c >= lim || g.n * g.p * g.q * g.k >= lim)
    return "tensor too large for 32-bit offsets";
  const bool prologue = kind == ConvKind::kFpropPrologue || kind == ConvKind::kWgradPrologue;
  switch (kind) {
    case ConvKind::kFprop:
    case ConvKind::kWgrad:
    case ConvKind::kWgradPrologue:
      break;
    case ConvKind::kFpropPrologue:
      if (f.has_bias) return "bias together with a BatchNorm prologue";
      break;
    case ConvKind::kDgrad:
      if (g.dil_h != 1 || g.dil_w != 1) return "dilated dgrad";
      break;
    default:
      return "unknown kernel kind";
  }
  if (prologue && !f.input_relu) return "BatchNorm prologue without ReLU";
  if (!prologue && f.input_relu) return "input ReLU without a BatchNorm prologue";
  if ((kind == ConvKind::kDgrad || kind == ConvKind::kWgrad || kind == ConvKind::kWgradPrologue) && f.has_bias)
    return "bias on a backward convolution";
  if ((kind == ConvKind::kWgrad || kind == ConvKind::kWgradPrologue) && f.has_residual)
    return "residual on a weight-gradient convolution";
  // grid.y <= 65535: tiles along K (fprop), C (dgrad) or R*S*C (wgrad)
  const int64_t gemm_n = (kind == ConvKind::kDgrad) ? g.c
                         : (kind == ConvKind::kWgrad || kind == ConvKind::kWgradPrologue) ? g.r * g.s * g.c
                                                                                         : g.k;
  if ((gemm_n + kConvTileN - 1) / kConvTileN > 65535) return "too many tiles along the GEMM N dimension";
  return nullptr;
}

}  // namespace fusedres
