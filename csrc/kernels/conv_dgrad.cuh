// CUTLASS data-gradient convolution (included by conv_dgrad_{f16,bf16}.cu only).
//
// run_dgrad (stride > 1 in either dimension): DefaultConv2dDgrad with the optimized iterators
// and StrideSupport::kStrided. The strided dgrad kernel (ImplicitGemmConvolutionStridedDgrad)
// splits dx into stride_h x stride_w phases, each an implicit GEMM over only the filter taps
// that reach it, so no work is spent on the zeros a stride-2 transposed convolution would
// insert; phases no tap reaches (1x1 stride-2 shortcuts) are written as zeros.
// run_dgrad_unity (stride 1): StrideSupport::kUnity, the plain implicit-GEMM dgrad CUTLASS
// prefers for unit stride. No dilation, no split-K.
#pragma once

// clang-format off: CUTLASS's device headers rely on the kernel headers coming first
#include "conv_cutlass_common.cuh"
#include <cutlass/conv/kernel/default_conv2d_dgrad.h>
#include <cutlass/conv/threadblock/threadblock_swizzle.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
#include <cutlass/conv/device/implicit_gemm_convolution.h>
// clang-format on

namespace fusedres {
namespace cutlass_conv {

template <typename T, bool kStrided>
struct DgradKernel {
  static constexpr int kAccess = 128 / cutlass::sizeof_bits<T>::value;
  using Op = ResidualActOp<T, kAccess>;
  using Swizzle = typename cutlass::platform::conditional<
      kStrided, cutlass::conv::threadblock::StridedDgradIdentityThreadblockSwizzle<1>,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>>::type;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dDgrad<
      T, cutlass::layout::TensorNHWC, T, cutlass::layout::TensorNHWC, T, cutlass::layout::TensorNHWC, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, Op, Swizzle,
      kStages, cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      kStrided ? cutlass::conv::StrideSupport::kStrided : cutlass::conv::StrideSupport::kUnity>::Kernel;
  using Device = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

template <typename T, bool kStrided>
ConvStatus launch_dgrad(const ConvDgradParams& p, cudaStream_t stream, bool check_only) {
  using Device = typename DgradKernel<T, kStrided>::Device;
  const ConvGeometry& g = p.g;
  // the addend as the epilogue's source (dx = acc + addend in float32, one rounding); the
  // strided kernel runs the epilogue on phases no filter tap reaches too (acc = 0), so
  // those get the addend alone. No ReLU.
  typename DgradKernel<T, kStrided>::Op::Params op;
  op.residual = p.addend != nullptr;
  const void* source = p.addend != nullptr ? p.addend : p.dx;
  typename Device::Arguments args(problem_of(g), nhwc_ref<T>(p.dy, g.n, g.p, g.q, g.k),
                                  nhwc_ref<T>(p.w, g.k, g.r, g.s, g.c), nhwc_ref<T>(source, g.n, g.h, g.w, g.c),
                                  nhwc_ref<T>(p.dx, g.n, g.h, g.w, g.c), op, cutlass::conv::SplitKMode::kSerial);
  return launch<Device>(args, stream, check_only);
}

template <typename T>
ConvStatus run_dgrad(const ConvDgradParams& p, cudaStream_t stream, bool check_only) {
  return launch_dgrad<T, true>(p, stream, check_only);
}

template <typename T>
ConvStatus run_dgrad_unity(const ConvDgradParams& p, cudaStream_t stream, bool check_only) {
  return launch_dgrad<T, false>(p, stream, check_only);
}

}  // namespace cutlass_conv
}  // namespace fusedres
