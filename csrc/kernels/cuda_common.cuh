// Device helpers shared by the CUDA kernels of csrc/kernels: conversions between the
// storage types and the compute type, 16-byte packs, exactly rounded multiply-add, launch
// sizing. Torch-free, like the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fusedres {
namespace cuda_detail {

// Storage type T <-> compute type (float for float, half and bfloat16; double for double).
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ static float to(float v) { return v; }
  __device__ static float from(float v) { return v; }
};
template <>
struct Cvt<double> {
  __device__ static double to(double v) { return v; }
  __device__ static double from(double v) { return v; }
};
template <>
struct Cvt<__half> {
  __device__ static float to(__half v) { return __half2float(v); }
  __device__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));

// V elements read or written as one 16-byte access.
template <typename T, int V>
struct alignas(16) Pack {
  T v[V];
};

template <typename S>
__device__ __forceinline__ S relu_nan(S z) {
  return z <= S(0) ? S(0) : z;  // NaN <= 0 is false: NaN propagates like torch.relu (fmaxf would drop it)
}

// a*b + c rounded twice, as torch computes y*scale + shift (nvcc would otherwise contract it
// into one fma): a ReLU mask recomputed in backward then agrees with the reference's.
__device__ __forceinline__ float mul_add_rn(float a, float b, float c) { return __fadd_rn(__fmul_rn(a, b), c); }
__device__ __forceinline__ double mul_add_rn(double a, double b, double c) { return __dadd_rn(__dmul_rn(a, b), c); }

// g of the BatchNorm(+ReLU) backward for one element (bn_kernels.h): dout zeroed where the
// ReLU was inactive (z = out when given, else y*scale + shift, rounded like torch; NaN z
// keeps dout), then times the sample's scale.
template <typename S>
__device__ __forceinline__ S bn_grad(S d, S yv, S ov, S scale, S shift, S k, bool relu, bool has_out, bool sample) {
  S g = d;
  if (relu) {
    const S z = has_out ? ov : mul_add_rn(yv, scale, shift);
    g = z <= S(0) ? S(0) : g;
  }
  if (sample) g = g * k;
  return g;
}

inline bool aligned16(const void* q) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % 16 == 0; }

// Blocks of a grid-stride loop over `work` items.
inline int grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

}  // namespace cuda_detail
}  // namespace fusedres
