// CUTLASS forward convolutions (included by conv_fprop*_{f16,bf16}.cu only).
//
// run_fprop: DefaultConv2dFpropWithBroadcast (implicit GEMM, optimized NHWC iterators) with
// BiasResidualActOp as the output functor of the broadcast epilogue: bias (a float32
// per-output-channel vector broadcast along the GEMM rows), residual (the epilogue's source
// tensor) and ReLU are applied to the float32 accumulators before the one rounding to the
// storage type, so the inference conv + folded BN + add + ReLU is one kernel.
//
// run_fprop_fused: DefaultConv2dFpropFusion (mainloop fusion, CUTLASS example 25): the
// activation tile is transformed to relu(x*scale[c] + shift[c]) in registers after its
// shared-memory load, with padding kept at zero; the default epilogue runs ResidualActOp.
#pragma once

// clang-format off: CUTLASS's device headers rely on the kernel headers coming first
#include "conv_cutlass_common.cuh"
#include <cutlass/conv/kernel/default_conv2d_fprop_fusion.h>
#include <cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
#include <cutlass/conv/device/implicit_gemm_convolution.h>
#include <cutlass/conv/device/implicit_gemm_convolution_fusion.h>
// clang-format on

namespace fusedres {
namespace cutlass_conv {

template <typename T>
struct FpropKernel {
  static constexpr int kAccess = 128 / cutlass::sizeof_bits<T>::value;
  using Op = BiasResidualActOp<T, kAccess>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      T, cutlass::layout::TensorNHWC, T, cutlass::layout::TensorNHWC, T, cutlass::layout::TensorNHWC, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, Op,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>, kStages, cutlass::arch::OpMultiplyAdd,
      cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  using Device = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

template <typename T>
ConvStatus run_fprop(const ConvFpropParams& p, cudaStream_t stream, bool check_only) {
  using Device = typename FpropKernel<T>::Device;
  const ConvGeometry& g = p.g;
  typename FpropKernel<T>::Op::Params op;
  op.residual = p.residual != nullptr;
  op.relu = p.relu;
  typename Device::Arguments args(problem_of(g), nhwc_ref<T>(p.x, g.n, g.h, g.w, g.c),
                                  nhwc_ref<T>(p.w, g.k, g.r, g.s, g.c), nhwc_ref<T>(p.residual, g.n, g.p, g.q, g.k),
                                  nhwc_ref<T>(p.y, g.n, g.p, g.q, g.k), op, cutlass::conv::SplitKMode::kSerial,
                                  const_cast<float*>(p.bias), nullptr, 0, 0);
  return launch<Device>(args, stream, check_only);
}

template <typename T>
struct FpropFusedKernel {
  static constexpr int kAccess = 128 / cutlass::sizeof_bits<T>::value;
  using Op = ResidualActOp<T, kAccess>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropFusion<
      T, cutlass::layout::TensorNHWC, T, cutlass::layout::TensorNHWC, T, cutlass::layout::RowMajor, T,
      cutlass::layout::TensorNHWC, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape,
      WarpShape, InstructionShape, Op, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>, kStages,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  using Device = cutlass::conv::device::ImplicitGemmConvolutionFusion<Kernel>;
};

template <typename T>
ConvStatus run_fprop_fused(const ConvFpropParams& p, cudaStream_t stream, bool check_only) {
  using Device = typename FpropFusedKernel<T>::Device;
  const ConvGeometry& g = p.g;
  typename FpropFusedKernel<T>::Op::Params op;
  op.residual = p.residual != nullptr;
  op.relu = p.relu;
  typename Device::Arguments args(problem_of(g), nhwc_ref<T>(p.x, g.n, g.h, g.w, g.c),
                                  nhwc_ref<T>(p.w, g.k, g.r, g.s, g.c), vector_ref<T>(p.in_scale, g.c),
                                  vector_ref<T>(p.in_shift, g.c), nhwc_ref<T>(p.residual, g.n, g.p, g.q, g.k),
                                  nhwc_ref<T>(p.y, g.n, g.p, g.q, g.k), op, cutlass::conv::SplitKMode::kSerial);
  return launch<Device>(args, stream, check_only);
}

}  // namespace cutlass_conv
}  // namespace fusedres
