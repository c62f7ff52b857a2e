// Pieces shared by the CUTLASS convolution instantiations (conv_*_{f16,bf16}.cu): element
// types, the tile configuration, the epilogue functors and the bfloat16 prologue transforms.
// Only the instantiation files include this (it pulls in CUTLASS); everything else sees the
// torch-free API of conv_cutlass.h.
//
// Tile configuration: one per kernel family, chosen for ResNet layer shapes (K, C >= 64,
// N*P*Q in the thousands) and to keep compile time down: 128x128x32 threadblock tiles,
// 64x64x32 warp tiles (4 warps), 16x8x16 bf16/f16 mma.sync, 4-stage cp.async pipeline
// (64 KiB of shared memory).
#pragma once

#include <cutlass/array.h>
#include <cutlass/bfloat16.h>
#include <cutlass/conv/conv2d_problem_size.h>
#include <cutlass/conv/convolution.h>
// memory_sm80.h defines the out-of-bounds fill pattern scale_bias_relu_transform.h uses
#include <cutlass/arch/memory_sm80.h>
#include <cutlass/conv/warp/scale_bias_relu_transform.h>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/gemm.h>
#include <cutlass/half.h>
#include <cutlass/layout/tensor.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/tensor_ref.h>

#include <cstdint>

#include "conv_cutlass.h"

namespace fusedres {
namespace cutlass_conv {

using ThreadblockShape = cutlass::gemm::GemmShape<128, 128, 32>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 32>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 16>;
constexpr int kStages = 4;

template <ConvDtype D>
struct ElementOf;
template <>
struct ElementOf<ConvDtype::kFloat16> {
  using type = cutlass::half_t;
};
template <>
struct ElementOf<ConvDtype::kBFloat16> {
  using type = cutlass::bfloat16_t;
};

// ReLU that keeps NaN (torch.relu does; fmaxf would not).
CUTLASS_HOST_DEVICE float relu_keep_nan(float v) { return v <= 0.f ? 0.f : v; }

inline cutlass::conv::Conv2dProblemSize problem_of(const ConvGeometry& g, int split_k = 1) {
  return cutlass::conv::Conv2dProblemSize(int(g.n), int(g.h), int(g.w), int(g.c), int(g.k), int(g.r), int(g.s),
                                          int(g.p), int(g.q), int(g.pad_h), int(g.pad_w), int(g.stride_h),
                                          int(g.stride_w), int(g.dil_h), int(g.dil_w),
                                          cutlass::conv::Mode::kCrossCorrelation, split_k, int(g.groups));
}

template <typename T>
cutlass::TensorRef<T, cutlass::layout::TensorNHWC> nhwc_ref(const void* ptr, int64_t n, int64_t h, int64_t w,
                                                            int64_t c) {
  return cutlass::TensorRef<T, cutlass::layout::TensorNHWC>(
      static_cast<T*>(const_cast<void*>(ptr)),
      cutlass::layout::TensorNHWC::packed(cutlass::Tensor4DCoord(int(n), int(h), int(w), int(c))));
}

template <typename T>
cutlass::TensorRef<T, cutlass::layout::RowMajor> vector_ref(const void* ptr, int64_t len) {
  return cutlass::TensorRef<T, cutlass::layout::RowMajor>(static_cast<T*>(const_cast<void*>(ptr)),
                                                          cutlass::layout::RowMajor(int(len)));
}

inline ConvStatus status_of(cutlass::Status s) {
  if (s == cutlass::Status::kSuccess) return ConvStatus::kOk;
  if (s == cutlass::Status::kErrorInternal || s == cutlass::Status::kErrorWorkspaceNull) return ConvStatus::kLaunchError;
  return ConvStatus::kUnsupported;
}

// The tail every instantiation shares: CUTLASS's can_implement() (all that check_only asks),
// then initialize + run on `stream`. `workspace`: the split-K slices' buffer where the kernel
// has one (CUTLASS zero-fills it on `stream` first when split_k > 1), else nullptr.
template <typename Device>
ConvStatus launch(typename Device::Arguments const& args, cudaStream_t stream, bool check_only,
                  void* workspace = nullptr) {
  if (Device::can_implement(args) != cutlass::Status::kSuccess) return ConvStatus::kUnsupported;
  if (check_only) return ConvStatus::kOk;
  Device conv;
  const ConvStatus st = status_of(conv.initialize(args, workspace, stream));
  return st != ConvStatus::kOk ? st : status_of(conv.run(stream));
}

// ----------------------------------------------------------------------------- epilogues

// Output functor of the broadcast epilogue (EpilogueWithBroadcast, single source):
//   Z = act(AB + V + C)  with V the broadcast per-column vector (the bias; all zeros when no
// bias pointer is given) and C the residual, read only when Params::residual is set.
// Computed in float32, rounded once to T. T (the "T tensor" of CUTLASS) is not stored.
template <typename T, int N>
struct BiasResidualActOp {
  using ElementOutput = T;
  using ElementC = T;
  using ElementZ = T;
  using ElementT = T;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementVector = float;
  static int const kElementsPerAccess = N;
  static int const kCount = N;
  static bool const kIsSingleSource = true;
  static bool const kStoreZ = true;
  static bool const kStoreT = false;
  static bool const kIsHeavy = false;

  using FragmentAccumulator = cutlass::Array<float, N>;
  using FragmentCompute = cutlass::Array<float, N>;
  using FragmentC = cutlass::Array<T, N>;
  using FragmentZ = cutlass::Array<T, N>;
  using FragmentT = cutlass::Array<T, N>;
  using FragmentOutput = FragmentZ;

  struct Params {
    bool residual = false;
    bool relu = false;
  };

  bool residual_, relu_;

  CUTLASS_HOST_DEVICE explicit BiasResidualActOp(Params const& p) : residual_(p.residual), relu_(p.relu) {}
  CUTLASS_HOST_DEVICE bool is_source_needed() const { return residual_; }
  // split-K is never used with this functor (the ReLU could not be split)
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}

  CUTLASS_HOST_DEVICE void operator()(FragmentZ& z, FragmentT&, FragmentAccumulator const& ab, FragmentC const& c,
                                      FragmentCompute const& v) const {
    cutlass::NumericArrayConverter<float, T, N> widen;
    const FragmentCompute r = widen(c);
    FragmentCompute out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
      const float a = (ab[i] + v[i]) + r[i];  // the reference's order: bias, then residual
      out[i] = relu_ ? relu_keep_nan(a) : a;
    }
    z = cutlass::NumericArrayConverter<T, float, N>()(out);
  }

  CUTLASS_HOST_DEVICE void operator()(FragmentZ& z, FragmentT&, FragmentAccumulator const& ab,
                                      FragmentCompute const& v) const {
    FragmentCompute out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
      const float a = ab[i] + v[i];
      out[i] = relu_ ? relu_keep_nan(a) : a;
    }
    z = cutlass::NumericArrayConverter<T, float, N>()(out);
  }
};

// Output functor of the default tensor-op epilogue: D = act(AB + C), C read only when
// Params::residual is set; float32 math, one rounding to T.
template <typename T, int N>
struct ResidualActOp {
  using ElementOutput = T;
  using ElementSource = T;
  using ElementAccumulator = float;
  using ElementCompute = float;
  static int const kCount = N;
  static bool const kIsHeavy = false;
  using FragmentOutput = cutlass::Array<T, N>;
  using FragmentSource = cutlass::Array<T, N>;
  using FragmentAccumulator = cutlass::Array<float, N>;
  using FragmentCompute = cutlass::Array<float, N>;

  struct Params {
    bool residual = false;
    bool relu = false;
  };

  bool residual_, relu_;

  CUTLASS_HOST_DEVICE explicit ResidualActOp(Params const& p) : residual_(p.residual), relu_(p.relu) {}
  CUTLASS_HOST_DEVICE bool is_source_needed() const { return residual_; }
  // parallel split-K writes each slice's plain partial sum (no residual, no ReLU): nothing to do
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}

  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& ab, FragmentSource const& c) const {
    const FragmentCompute r = cutlass::NumericArrayConverter<float, T, N>()(c);
    FragmentCompute out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) {
      const float a = ab[i] + r[i];
      out[i] = relu_ ? relu_keep_nan(a) : a;
    }
    return cutlass::NumericArrayConverter<T, float, N>()(out);
  }

  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& ab) const {
    FragmentCompute out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = relu_ ? relu_keep_nan(ab[i]) : ab[i];
    return cutlass::NumericArrayConverter<T, float, N>()(out);
  }
};

// ----------------------------------------------------------------- bf16 prologue transform

// CUTLASS's mainloop-fusion kernels fill out-of-bounds (padding) activations with the 16-bit
// pattern 0x7eff and apply relu(x*scale + shift) per pair of 16-bit values with f16x2 math
// (conv/warp/scale_bias_relu_transform.h), which is correct for float16 only. The
// specialisations below (further down, in cutlass::conv::warp) do the same for bfloat16
// with bf16x2 math: one rounding of x*scale + shift, ReLU that keeps NaN, and the padding
// lanes forced to zero. In bfloat16 0x7eff is a finite value (~1.7e38): such an input would
// read as padding; real activations never come near it.
CUTLASS_DEVICE uint32_t bf16x2_scale_shift_relu(uint32_t x, uint32_t scale, uint32_t shift) {
  uint32_t r = 0;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm("fma.rn.relu.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(x), "r"(scale), "r"(shift));
  if ((x & 0xffffu) == cutlass::arch::OOB_NAN_F16) r &= 0xffff0000u;
  if ((x >> 16) == cutlass::arch::OOB_NAN_F16) r &= 0x0000ffffu;
#endif
  return r;
}

}  // namespace cutlass_conv
}  // namespace fusedres

namespace cutlass {
namespace conv {
namespace warp {

// The scale/bias fragments hold 16-bit values as loaded (bit patterns; the wgrad iterator
// types them as __half2 whatever the element), interleaved as 32-bit words: (two scales,
// two shifts) per pair of activation words.
//
// Fprop: activation pair i takes the (scale pair, shift pair) word pair number (i/2) % 2 of
// the scale/bias fragment (two columns of the 16x8x16 mma per k-group).
template <int NA, bool RA, typename FragmentScaleBias>
struct FpropScaleBiasReluTransform<Array<bfloat16_t, NA, RA>, FragmentScaleBias> {
  static_assert(NA % 2 == 0 && sizeof(FragmentScaleBias) >= 16, "unexpected fragment shapes");
  CUTLASS_DEVICE void operator()(Array<bfloat16_t, NA, RA>& act, FragmentScaleBias const& sb) {
    uint32_t* a = reinterpret_cast<uint32_t*>(&act);
    uint32_t const* w = reinterpret_cast<uint32_t const*>(&sb);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < NA / 2; ++i) {
      const int u = (i / 2) % 2;
      a[i] = fusedres::cutlass_conv::bf16x2_scale_shift_relu(a[i], w[2 * u], w[2 * u + 1]);
    }
  }
};

// Wgrad: activation pair i takes word pair number i/2 (two rows per k-group).
template <int NA, bool RA, typename FragmentScaleBias>
struct WgradScaleBiasReluTransform<Array<bfloat16_t, NA, RA>, FragmentScaleBias> {
  static_assert(NA % 2 == 0 && sizeof(FragmentScaleBias) / 4 >= 2 * ((NA / 2 - 1) / 2 + 1),
                "unexpected fragment shapes");
  CUTLASS_DEVICE void operator()(Array<bfloat16_t, NA, RA>& act, FragmentScaleBias const& sb) {
    uint32_t* a = reinterpret_cast<uint32_t*>(&act);
    uint32_t const* w = reinterpret_cast<uint32_t const*>(&sb);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < NA / 2; ++i) {
      const int u = i / 2;
      a[i] = fusedres::cutlass_conv::bf16x2_scale_shift_relu(a[i], w[2 * u], w[2 * u + 1]);
    }
  }
};

}  // namespace warp
}  // namespace conv
}  // namespace cutlass
