// CUTLASS grouped forward convolution (ResNeXt's 3x3 convolutions; included by
// conv_fprop_group_{f16,bf16}.cu only).
//
// run_fprop_group: DefaultConv2dGroupFprop in GroupMode::kMultipleGroup with the analytic
// iterators (the only ones CUTLASS has for that mode). A CTA owns a 64-column tile of the
// output channels, i.e. 64 / (K/groups) whole groups, and walks through each group's
// R*S*(C/groups) reduction in 32-channel slices; the filter iterator zero-fills the
// (k, c) pairs of other groups, so the tile's mma is block-diagonal. The support predicate
// (conv_support.h) asks for C/groups a multiple of 32, so that no slice reads the channels
// of a neighbouring group.
//
// CUTLASS's group kernel has the default epilogue only (no broadcast vector), so the folded
// BatchNorm bias comes in as the epilogue's source tensor C with all strides zero: every
// output row reads the same K-vector, and ResidualActOp computes act(AB + bias) in float32
// with one rounding. The bias is therefore held in the storage type (ConvFpropParams::
// bias_storage): one more rounding than the ungrouped kernel's float32 bias. No residual:
// the source slot is the bias (ResNeXt's grouped convolution is never the one the shortcut
// is added to).
#pragma once

// clang-format off: CUTLASS's device headers rely on the kernel headers coming first
#include "conv_cutlass_common.cuh"
#include <cutlass/conv/kernel/default_conv2d_group_fprop.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
#include <cutlass/conv/device/implicit_gemm_convolution.h>
// clang-format on

namespace fusedres {
namespace cutlass_conv {

using GroupThreadblockShape = cutlass::gemm::GemmShape<128, kConvGroupTileN, kConvGroupTileK>;
using GroupWarpShape = cutlass::gemm::GemmShape<64, 32, kConvGroupTileK>;  // 4 warps

template <typename T>
struct FpropGroupKernel {
  static constexpr int kAccess = 128 / cutlass::sizeof_bits<T>::value;
  using Op = ResidualActOp<T, kAccess>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dGroupFprop<
      T, cutlass::layout::TensorNHWC, T, cutlass::layout::TensorNHWC, T, cutlass::layout::TensorNHWC, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, GroupThreadblockShape, GroupWarpShape, InstructionShape,
      Op, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>, kStages, cutlass::arch::OpMultiplyAdd,
      cutlass::conv::GroupMode::kMultipleGroup, cutlass::conv::IteratorAlgorithm::kAnalytic>::Kernel;
  using Device = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
  static_assert(Device::ThreadblockShape::kN == kConvGroupTileN && Device::ThreadblockShape::kK == kConvGroupTileK,
                "conv_support.h's grouped tile constants must match the kernel");
};

template <typename T>
ConvStatus run_fprop_group(const ConvFpropParams& p, cudaStream_t stream, bool check_only) {
  using Device = typename FpropGroupKernel<T>::Device;
  const ConvGeometry& g = p.g;
  typename FpropGroupKernel<T>::Op::Params op;
  op.residual = p.bias_storage != nullptr;  // the source tensor is the broadcast bias
  op.relu = p.relu;
  // the bias as an NHWC tensor whose every stride is zero: element (n, p, q, k) is bias[k]
  const cutlass::TensorRef<T, cutlass::layout::TensorNHWC> bias(
      static_cast<T*>(const_cast<void*>(p.bias_storage)),
      cutlass::layout::TensorNHWC(cutlass::layout::TensorNHWC::Stride(0)));
  typename Device::Arguments args(problem_of(g), nhwc_ref<T>(p.x, g.n, g.h, g.w, g.c),
                                  nhwc_ref<T>(p.w, g.k, g.r, g.s, g.c / g.groups), bias,
                                  nhwc_ref<T>(p.y, g.n, g.p, g.q, g.k), op, cutlass::conv::SplitKMode::kSerial);
  return launch<Device>(args, stream, check_only);
}

}  // namespace cutlass_conv
}  // namespace fusedres
