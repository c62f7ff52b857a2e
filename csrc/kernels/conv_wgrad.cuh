// CUTLASS weight-gradient convolutions (included by conv_wgrad*_{f16,bf16}.cu only).
//
// The GEMM is [K] x [R*S*C] with the reduction over N*P*Q, which for ResNet layers is long
// while the output grid is small: parallel split-K cuts the reduction into p.split_k slices,
// each CTA writing its float32 partial tile to slice k of p.workspace ([split_k, K, R, S, C]);
// conv_cutlass.cu then adds the slices in a fixed order. ResidualActOp<float> stores the
// partial sums as they are.
//
// run_wgrad: DefaultConv2dWgrad, optimized iterators.
// run_wgrad_fused: DefaultConv2dWgradFusion: the activation operand (B) is transformed to
// relu(x*scale[c] + shift[c]) after its shared-memory load, padding kept at zero, so the
// BatchNorm + ReLU output that fed the forward conv is recomputed, never stored.
#pragma once

// clang-format off: CUTLASS's device headers rely on the kernel headers coming first
#include "conv_cutlass_common.cuh"
#include <cutlass/conv/kernel/default_conv2d_wgrad.h>
#include <cutlass/conv/kernel/default_conv2d_wgrad_fusion.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
#include <cutlass/conv/device/implicit_gemm_convolution.h>
#include <cutlass/conv/device/implicit_gemm_convolution_fusion.h>
// clang-format on

namespace fusedres {
namespace cutlass_conv {

using WgradOp = ResidualActOp<float, 4>;

template <typename T>
struct WgradKernel {
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dWgrad<
      T, cutlass::layout::TensorNHWC, T, cutlass::layout::TensorNHWC, float, cutlass::layout::TensorNHWC, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, WgradOp,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>, kStages, cutlass::arch::OpMultiplyAdd,
      cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  using Device = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

// The prologue's scale/shift fragments and the transformed B tile need registers next to a
// 64x64 warp tile's accumulators: with 4 warps of 64x64 the kernel spilled (ptxas: 255
// registers, 52 B of spills in bf16, 80 B in fp16). 8 warps of 64x32 halve the accumulator
// per thread and keep the same 128x128 CTA tile (benchmarks/cuda_audit.py checks it).
using WgradFusedWarpShape = cutlass::gemm::GemmShape<64, 32, 32>;

template <typename T>
struct WgradFusedKernel {
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dWgradFusion<
      T, cutlass::layout::TensorNHWC, T, cutlass::layout::TensorNHWC, T, cutlass::layout::RowMajor, float,
      cutlass::layout::TensorNHWC, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, ThreadblockShape,
      WgradFusedWarpShape, InstructionShape, WgradOp, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<4>, kStages,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  using Device = cutlass::conv::device::ImplicitGemmConvolutionFusion<Kernel>;
};

template <typename T>
ConvStatus run_wgrad(const ConvWgradParams& p, cudaStream_t stream, bool check_only) {
  using Device = typename WgradKernel<T>::Device;
  const ConvGeometry& g = p.g;
  const auto ws = nhwc_ref<float>(p.workspace, g.k, g.r, g.s, g.c);
  typename Device::Arguments args(problem_of(g, p.split_k), nhwc_ref<T>(p.dy, g.n, g.p, g.q, g.k),
                                  nhwc_ref<T>(p.x, g.n, g.h, g.w, g.c), ws, ws, WgradOp::Params(),
                                  cutlass::conv::SplitKMode::kParallel);
  return launch<Device>(args, stream, check_only, p.workspace);
}

template <typename T>
ConvStatus run_wgrad_fused(const ConvWgradParams& p, cudaStream_t stream, bool check_only) {
  using Device = typename WgradFusedKernel<T>::Device;
  const ConvGeometry& g = p.g;
  const auto ws = nhwc_ref<float>(p.workspace, g.k, g.r, g.s, g.c);
  typename Device::Arguments args(problem_of(g, p.split_k), nhwc_ref<T>(p.dy, g.n, g.p, g.q, g.k),
                                  nhwc_ref<T>(p.x, g.n, g.h, g.w, g.c), vector_ref<T>(p.in_scale, g.c),
                                  vector_ref<T>(p.in_shift, g.c), ws, ws, WgradOp::Params(),
                                  cutlass::conv::SplitKMode::kParallel);
  return launch<Device>(args, stream, check_only, p.workspace);
}

}  // namespace cutlass_conv
}  // namespace fusedres
