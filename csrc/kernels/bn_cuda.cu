// CUDA kernels for bn_add_act and bn_finalize.
//
// bn_add_act is bandwidth bound: with 16-byte aligned pointers it moves 16 bytes per
// load/store (8 bf16/fp16, 4 fp32 or 2 fp64 values): along C in NHWC when C is a multiple
// of the vector width, along H*W in NCHW when H*W is; everything else takes the scalar path
// (one element per thread, any C and H*W). Indexing is int64 throughout, so
// tensors with more than 2^31 elements are safe. bn_finalize merges tiles in a fixed order
// per channel (one thread per channel), so it is deterministic without atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "bn_cuda.cuh"
#include "chan_merge.h"
#include "cuda_common.cuh"

namespace fusedres {
namespace {

using namespace cuda_detail;

template <typename T, typename S>
__device__ __forceinline__ T one(const T* y, const T* r, int64_t i, int64_t ch, int64_t n, const BnAddActParams<S>& p) {
  S z = Cvt<T>::to(y[i]) * p.scale[ch] + p.shift[ch];
  if (p.sample_scale != nullptr) z *= p.sample_scale[n];
  if (r != nullptr) {
    S rv = Cvt<T>::to(r[i]);
    if (p.res_scale != nullptr) rv = rv * p.res_scale[ch] + p.res_shift[ch];
    z += rv;
  }
  return Cvt<T>::from(p.relu ? relu_nan(z) : z);
}

template <typename T, typename S>
__global__ void bn_add_act_scalar(const T* __restrict__ y, const T* __restrict__ r, T* __restrict__ out,
                                  BnAddActParams<S> p, int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    int64_t ch, n;
    if (p.layout == Layout::NHWC) {
      ch = i % p.c;
      n = i / (p.hw * p.c);
    } else {
      ch = (i / p.hw) % p.c;
      n = i / (p.hw * p.c);
    }
    out[i] = one<T, S>(y, r, i, ch, n, p);
  }
}

// 16-byte vectors of V elements, all pointers 16-byte aligned.
//   NHWC (C % V == 0): a vector is V consecutive channels of one pixel
//   NCHW (H*W % V == 0): a vector is V consecutive pixels of one (n, c) plane
template <typename T, typename S, int V, bool Nhwc>
__global__ void bn_add_act_vec(const T* __restrict__ y, const T* __restrict__ r, T* __restrict__ out,
                               BnAddActParams<S> p, int64_t total_vec) {
  using Pack = cuda_detail::Pack<T, V>;
  static_assert(sizeof(Pack) == 16, "a pack is one 16-byte access");
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total_vec; i += stride) {
    int64_t ch0, n;
    if (Nhwc) {
      const int64_t cv = p.c / V;
      ch0 = (i % cv) * V;
      n = i / (p.hw * cv);
    } else {
      const int64_t plane = i / (p.hw / V);
      ch0 = plane % p.c;
      n = plane / p.c;
    }
    const Pack yv = reinterpret_cast<const Pack*>(y)[i];
    Pack rv;
    if (r != nullptr) rv = reinterpret_cast<const Pack*>(r)[i];
    const S k = p.sample_scale != nullptr ? p.sample_scale[n] : S(1);
    Pack o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t ch = Nhwc ? ch0 + j : ch0;
      S z = (Cvt<T>::to(yv.v[j]) * p.scale[ch] + p.shift[ch]) * k;
      if (r != nullptr) {
        S q = Cvt<T>::to(rv.v[j]);
        if (p.res_scale != nullptr) q = q * p.res_scale[ch] + p.res_shift[ch];
        z += q;
      }
      o.v[j] = Cvt<T>::from(p.relu ? relu_nan(z) : z);
    }
    reinterpret_cast<Pack*>(out)[i] = o;
  }
}

template <typename S>
__global__ void bn_finalize_kernel(BnFinalizeParams<S> p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < p.c) finalize_channel(p, c);
}

}  // namespace

template <typename T, typename S>
cudaError_t bn_add_act_cuda(const T* y, const T* residual, T* out, const BnAddActParams<S>& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t total = p.n * p.c * p.hw;
  if (total == 0) return cudaSuccess;
  constexpr int threads = 256;
  const bool vec_ok = V > 1 && aligned16(y) && aligned16(residual) && aligned16(out);
  if (vec_ok && p.layout == Layout::NHWC && p.c % V == 0) {
    const int64_t total_vec = total / V;
    bn_add_act_vec<T, S, V, true><<<grid_for(total_vec, threads), threads, 0, stream>>>(y, residual, out, p, total_vec);
  } else if (vec_ok && p.layout == Layout::NCHW && p.hw % V == 0) {
    const int64_t total_vec = total / V;
    bn_add_act_vec<T, S, V, false><<<grid_for(total_vec, threads), threads, 0, stream>>>(y, residual, out, p, total_vec);
  } else {
    bn_add_act_scalar<T, S><<<grid_for(total, threads), threads, 0, stream>>>(y, residual, out, p, total);
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t bn_finalize_cuda(const BnFinalizeParams<S>& p, cudaStream_t stream) {
  if (p.c == 0) return cudaSuccess;
  constexpr int threads = 128;
  bn_finalize_kernel<S><<<static_cast<int>((p.c + threads - 1) / threads), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t bn_add_act_cuda<float, float>(const float*, const float*, float*, const BnAddActParams<float>&,
                                                   cudaStream_t);
template cudaError_t bn_add_act_cuda<double, double>(const double*, const double*, double*,
                                                     const BnAddActParams<double>&, cudaStream_t);
template cudaError_t bn_add_act_cuda<__half, float>(const __half*, const __half*, __half*, const BnAddActParams<float>&,
                                                    cudaStream_t);
template cudaError_t bn_add_act_cuda<__nv_bfloat16, float>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                           __nv_bfloat16*, const BnAddActParams<float>&, cudaStream_t);
template cudaError_t bn_finalize_cuda<float>(const BnFinalizeParams<float>&, cudaStream_t);
template cudaError_t bn_finalize_cuda<double>(const BnFinalizeParams<double>&, cudaStream_t);

}  // namespace fusedres
