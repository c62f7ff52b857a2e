// Hopper-native forward convolution (included by conv_fprop_sm90*_bf16.cu only): CUTLASS 3.x
// implicit GEMM for sm_90a. The activation tile comes in by TMA in im2col mode, the filter
// tile by TMA, six shared-memory stages feed warpgroup MMA (wgmma, 64x128x16 bf16 atoms, one
// consumer warpgroup per 128x128x64 CTA tile, a producer warp issuing the loads), and the
// epilogue is a visitor tree over the float32 accumulators:
//
//   y = floor((acc + bias[k]) + residual, lo)     floor(v, lo) = v <= lo ? lo : v
//
// with lo = 0 for the ReLU (NaN stays NaN, as relu_keep_nan of the Sm80 kernels) and
// lo = -inf without it (the identity, -inf included), in the order of the reference (bias,
// then residual), rounded once to the storage type. The bias is a float32 row broadcast read
// as 0 when its pointer is null; the residual is the epilogue's source tensor, so the kernels
// with and without it are two instantiations (a void source loads nothing).
//
// GEMM view (CUTLASS 3.x fprop): A = x [N*P*Q rows (im2col), R*S*C], B = w [K, R*S*C],
// D = y [N*P*Q, K]; the output channel is the GEMM column.
#pragma once

// clang-format off: the CUTLASS 3.x headers want the kernel-level ones first
#include <cutlass/cutlass.h>
#include <cutlass/kernel_hardware_info.hpp>
#include <cute/tensor.hpp>
#include <cutlass/conv/convolution.h>
#include <cutlass/conv/convnd_problem_shape.hpp>
#include <cutlass/conv/dispatch_policy.hpp>
#include <cutlass/conv/collective/collective_builder.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/conv/device/conv_universal_adapter.hpp>
#include <cutlass/conv/kernel/conv_universal.hpp>
// clang-format on

#include <limits>

#include "conv_cutlass.h"

namespace fusedres {
namespace cutlass_conv {
namespace sm90 {

using namespace cute;
namespace fu = cutlass::epilogue::fusion;

// v <= lo ? lo : v, elementwise (the visitor tree applies it to register fragments)
template <class T>
struct FloorKeepNan {
  CUTLASS_HOST_DEVICE T operator()(T const& v, T const& lo) const { return v <= lo ? lo : v; }
};
template <class T, int N>
struct FloorKeepNan<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& v,
                                                      cutlass::Array<T, N> const& lo) const {
    cutlass::Array<T, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = v[i] <= lo[i] ? lo[i] : v[i];
    return r;
  }
};

using TileShape = Shape<_128, _128, Shape<_64>>;
using ClusterShape = Shape<_1, _1, _1>;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

template <class T, bool Residual>
struct Fprop {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<T>::value;
  using Plus = fu::Sm90Compute<cutlass::plus, float, float, kRound>;
  using Bias = fu::Sm90RowBroadcast<0, TileShape, float, float>;
  using AccBias = fu::Sm90EVT<Plus, fu::Sm90AccFetch, Bias>;
  using Sum = cute::conditional_t<Residual, fu::Sm90EVT<Plus, AccBias, fu::Sm90SrcFetch<T>>, AccBias>;
  using Tree = fu::Sm90EVT<fu::Sm90Compute<FloorKeepNan, T, float, kRound>, Sum, fu::Sm90ScalarBroadcast<float>>;
  using ElementC = cute::conditional_t<Residual, T, void>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, cutlass::layout::TensorNHWC, kAlign, T,
      cutlass::layout::TensorNHWC, kAlign, cutlass::epilogue::TmaWarpSpecialized, Tree>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop, T,
      cutlass::layout::TensorNHWC, kAlign, T, cutlass::layout::TensorNHWC, kAlign, float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;
  using Problem =
      cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, Mainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue>;
  using Device = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

// kUnsupported when CUTLASS's can_implement() refuses the problem (the caller then runs the
// Sm80 kernel); with check_only nothing is launched. The kernel needs no workspace (checked).
template <class T, bool Residual>
ConvStatus run_fprop(const ConvFpropParams& p, cudaStream_t stream, bool check_only) {
  using K = Fprop<T, Residual>;
  using Device = typename K::Device;
  const ConvGeometry& g = p.g;
  if (g.groups != 1 || p.in_scale != nullptr || p.bias_storage != nullptr || (p.residual != nullptr) != Residual)
    return ConvStatus::kUnsupported;
  typename K::Problem problem(cutlass::conv::Mode::kCrossCorrelation, {int(g.n), int(g.h), int(g.w), int(g.c)},
                              {int(g.k), int(g.r), int(g.s), int(g.c)}, {int(g.pad_h), int(g.pad_w)},
                              {int(g.pad_h), int(g.pad_w)}, {int(g.stride_h), int(g.stride_w)},
                              {int(g.dil_h), int(g.dil_w)}, 1);
  // the output [N, P, Q, K] as the GEMM's D (and C): strides from the problem's own
  typename Device::ConvKernel::StrideC stride_c{};
  typename Device::ConvKernel::StrideD stride_d{};
  cute::for_each(cute::make_seq<cute::rank<0>(decltype(stride_c){})>{}, [&](auto i) {
    cute::get<0, i>(stride_c) = problem.stride_C[K::Problem::RankT - 2 - i];
  });
  cute::for_each(cute::make_seq<cute::rank<0>(decltype(stride_d){})>{}, [&](auto i) {
    cute::get<0, i>(stride_d) = problem.stride_C[K::Problem::RankT - 2 - i];
  });
  const float lo = p.relu ? 0.f : -std::numeric_limits<float>::infinity();
  typename K::Bias::Arguments bias{p.bias, 0.f, {}};
  typename K::AccBias::Arguments acc_bias{{}, bias, {}};
  typename K::Sum::Arguments sum = [&] {
    if constexpr (Residual) {
      return typename K::Sum::Arguments{acc_bias, {}, {}};
    } else {
      return acc_bias;
    }
  }();
  typename K::Tree::Arguments tree{sum, {{lo}}, {}};
  using PtrC = typename K::ElementC const*;
  const PtrC ptr_c = Residual ? static_cast<PtrC>(p.residual) : nullptr;
  typename Device::Arguments args{problem,
                                  {static_cast<T const*>(p.x), static_cast<T const*>(p.w)},
                                  {tree, ptr_c, stride_c, static_cast<T*>(p.y), stride_d}};
  // no workspace is passed: a configuration that wants one is refused, not run
  if (Device::can_implement(args) != cutlass::Status::kSuccess || Device::get_workspace_size(args) != 0)
    return ConvStatus::kUnsupported;
  if (check_only) return ConvStatus::kOk;
  Device conv;
  if (conv.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return ConvStatus::kLaunchError;
  return conv.run(stream) == cutlass::Status::kSuccess ? ConvStatus::kOk : ConvStatus::kLaunchError;
}

}  // namespace sm90
}  // namespace cutlass_conv
}  // namespace fusedres
