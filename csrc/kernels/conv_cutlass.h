// Implicit-GEMM convolutions of fusedres on CUTLASS 2.x tensor-core kernels (arch Sm80
// templates: compiled for sm_80 and sm_90a, they run on Ampere and Hopper), and, on request,
// a Hopper-native forward (CUTLASS 3.x: TMA, wgmma, an epilogue visitor tree). Torch-free:
// raw device pointers, sizes and a cudaStream_t. NHWC activations, KRSC filters, float16 or
// bfloat16 storage, float32 accumulation.
//
// Which calls are supported is decided once, by conv_cutlass_unsupported() in
// conv_support.h; every launcher checks it (and CUTLASS's can_implement()) again and returns
// ConvStatus::kUnsupported rather than launching a kernel that cannot run the shape.
//
// Launchers enqueue work on `stream` only: no allocation, no host synchronisation (safe
// inside CUDA-graph capture). Buffers they need beyond the operands are passed in by the
// caller, sized by the matching *_workspace_bytes() function.
//
// When the library is compiled without CUTLASS (FUSEDRES_WITH_CUTLASS undefined) the
// launchers exist and return ConvStatus::kNotBuilt.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "conv_support.h"

namespace fusedres {

enum class ConvStatus : int {
  kOk = 0,
  kUnsupported = 1,  // conv_cutlass_unsupported() or CUTLASS's can_implement() refused it
  kLaunchError = 2,  // a CUDA error while configuring or launching (see cudaGetLastError)
  kNotBuilt = 3,     // compiled without CUTLASS
};

const char* conv_status_string(ConvStatus s);

// Whether the CUTLASS kernels are compiled in, and a one-line description of them.
bool conv_cutlass_built();
const char* conv_cutlass_description();

// Forward, inference form (kind kFprop):
//   y[n,p,q,k] = act(sum_{r,s,c} x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, c] * w[k,r,s,c]
//                    + bias[k] + residual[n,p,q,k])
// Forward with the previous BatchNorm applied on load (kind kFpropPrologue):
//   same with x replaced by relu(x*in_scale[c] + in_shift[c]) (zero padding stays zero)
//   and no bias. act = ReLU when relu (NaN kept as NaN), identity otherwise.
// Grouped forward (g.groups > 1, kind kFprop): output channel k sees only the input
//   channels of its group, w is [K, R, S, C/groups]; the bias comes in the storage dtype
//   (bias_storage; `bias` must be null) and there is no residual.
// Pointers: 16-byte aligned; bias (float) 32-byte aligned.
struct ConvFpropParams {
  ConvGeometry g;
  ConvDtype dtype = ConvDtype::kOther;
  const void* x = nullptr;         // [N, H, W, C]
  const void* w = nullptr;         // [K, R, S, C/groups]
  void* y = nullptr;               // [N, P, Q, K]
  const float* bias = nullptr;     // [K] or nullptr (kFprop, groups 1)
  const void* bias_storage = nullptr;  // [K] in the storage dtype or nullptr (grouped kFprop)
  const void* residual = nullptr;  // [N, P, Q, K] or nullptr
  const void* in_scale = nullptr;  // [C] in the storage dtype: kFpropPrologue iff given
  const void* in_shift = nullptr;  // [C] in the storage dtype
  bool relu = false;
  // Run the Hopper-native kernel (conv_fprop_sm90.cuh) where it takes the call: an sm_90
  // device, bfloat16, groups 1, no prologue, and CUTLASS 3.x's can_implement(); otherwise
  // (and when it is not built) the Sm80 kernel runs. Not yet the default: no GPU has run it.
  bool hopper = false;
};
ConvStatus conv_fprop_cutlass(const ConvFpropParams& p, cudaStream_t stream);

// Whether the Hopper-native forward is compiled in (CUTLASS 3.x headers and their
// tools/util/include found at build time).
bool conv_sm90_built();

// dx[n,h,w,c] = sum over (p,q,r,s,k) with h = p*sh - ph + r, w = q*sw - pw + s of
//               dy[n,p,q,k] * w[k,r,s,c]   (dilation 1)
//             (+ addend[n,h,w,c] when given: added to the float32 sum, one rounding)
struct ConvDgradParams {
  ConvGeometry g;
  ConvDtype dtype = ConvDtype::kOther;
  const void* dy = nullptr;      // [N, P, Q, K]
  const void* w = nullptr;       // [K, R, S, C]
  const void* addend = nullptr;  // [N, H, W, C] or nullptr (a block's shortcut gradient)
  void* dx = nullptr;            // [N, H, W, C]
};
ConvStatus conv_dgrad_cutlass(const ConvDgradParams& p, cudaStream_t stream);

// dw[k,r,s,c] = sum_{n,p,q} dy[n,p,q,k] * h[n, p*sh - ph + r*dh, q*sw - pw + s*dw, c], with
// h = x, or relu(x*in_scale[c] + in_shift[c]) when in_scale is given (kWgradPrologue).
// The GEMM reduction (over N*P*Q) is split in `split_k` slices whose float32 partial sums
// go to `workspace`; a second kernel adds the slices in a fixed order (deterministic) and
// stores dw in the storage dtype, KRSC or KCRS (dw_kcrs, PyTorch's contiguous [K, C, R, S]).
struct ConvWgradParams {
  ConvGeometry g;
  ConvDtype dtype = ConvDtype::kOther;
  const void* dy = nullptr;        // [N, P, Q, K]
  const void* x = nullptr;         // [N, H, W, C]
  const void* in_scale = nullptr;  // [C] storage dtype, or nullptr
  const void* in_shift = nullptr;  // [C]
  void* dw = nullptr;              // [K, R, S, C] or [K, C, R, S]
  bool dw_kcrs = false;
  int split_k = 1;                 // from conv_wgrad_split_k()
  void* workspace = nullptr;       // conv_wgrad_workspace_bytes(g, split_k) bytes, 16-byte aligned
};
// Slices that give about two waves of CTAs on a 132-multiprocessor GPU (H100/H200 SXM; 1 when
// the tile grid alone fills it). A pure function of the geometry: the split, and with it the
// order of the float32 additions, is the same on every GPU model, so results are bitwise
// reproducible across GPUs (a GPU with fewer multiprocessors runs more waves).
constexpr int kWgradSplitTargetCtas = 2 * 132;
int conv_wgrad_split_k(const ConvGeometry& g);
size_t conv_wgrad_workspace_bytes(const ConvGeometry& g, int split_k);
ConvStatus conv_wgrad_cutlass(const ConvWgradParams& p, cudaStream_t stream);

// Host-only check, no GPU needed: kOk when conv_cutlass_unsupported() accepts the call and
// the CUTLASS kernel of `kind` (dtype) also accepts the problem in its can_implement();
// kUnsupported otherwise, kNotBuilt without CUTLASS. Used by the tests to show that the
// support predicate never admits a shape CUTLASS would refuse.
ConvStatus conv_cutlass_check(ConvKind kind, ConvDtype dtype, const ConvGeometry& g, const ConvCallFlags& flags,
                              int split_k = 1);
// The same for the Hopper-native forward (kind kFprop, bfloat16, groups 1): kOk when
// conv_cutlass_unsupported() accepts the call and CUTLASS 3.x's can_implement() takes it;
// kUnsupported otherwise (the Sm80 kernel then runs it), kNotBuilt when it is not compiled in.
ConvStatus conv_cutlass_check_sm90(ConvDtype dtype, const ConvGeometry& g, const ConvCallFlags& flags);

// Per-channel batch statistics of an NHWC tensor y [M, K] (M = N*P*Q), 16-bit storage, K a
// multiple of 8: partials [1, 3, K] float32 = (count, mean, M2) per channel, the layout of
// fusedres.reference._partials. Rows are cut into fixed tiles of kConvStatsTileRows whose
// (count, mean, M2) go to `workspace` [tiles, 3, K]; a second kernel Chan-merges the tiles
// of each channel in a fixed order (float64). No atomics: deterministic.
constexpr int64_t kConvStatsTileRows = 256;
size_t conv_stats_workspace_bytes(int64_t m, int64_t k);
ConvStatus conv_stats_nhwc(ConvDtype dtype, const void* y, int64_t m, int64_t k, float* partials, void* workspace,
                           cudaStream_t stream);

}  // namespace fusedres
