// CUDA kernels of the elementwise BatchNorm backward: the per-channel coefficients, the
// apply dy = A*g + B*y + C (+ an addend, one rounding; the masked g stored too on request),
// and act_grad (ReLU backward from the activated output).
//
// Both elementwise kernels are bandwidth bound and, like bn_add_act, move 16 bytes per
// load/store when every pointer is 16-byte aligned: the apply along C in NHWC when C is a
// multiple of the vector width V = 16/sizeof(T), along H*W in NCHW when H*W is; act_grad,
// which has no channel, over the flat elements with a scalar tail. Otherwise one element
// per thread. Indexing is int64 throughout.
#include <cstdint>

#include "bn_cuda.cuh"
#include "cuda_common.cuh"

namespace fusedres {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;

template <typename S>
__global__ void coefs_kernel(BnBackwardParams<S> p, const S* __restrict__ sum_g, const S* __restrict__ sum_gx,
                             S* __restrict__ coefs) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.c) return;
  const S m = S(p.n * p.hw);
  bn_backward_coefs_channel<S>(p.scale[c], p.invstd[c], p.mean[c], sum_g[c], sum_gx[c], m, coefs + c,
                               coefs + p.c + c, coefs + 2 * p.c + c);
}

// dy of one element of channel ch, sample n (d, yv, ov already in S); g0: the masked
// gradient before the sample's scale (what grad_out stores).
template <typename S>
__device__ __forceinline__ S apply_one(S d, S yv, S ov, int64_t ch, int64_t n, bool has_out,
                                       const BnBackwardParams<S>& p, S& g0) {
  g0 = bn_grad(d, yv, ov, p.scale[ch], p.shift[ch], S(1), p.relu, has_out, false);
  const S g = p.sample_scale != nullptr ? g0 * p.sample_scale[n] : g0;
  return g * p.coefs[ch] + yv * p.coefs[p.c + ch] + p.coefs[2 * p.c + ch];
}

template <typename T, typename S>
__global__ void apply_scalar(const T* __restrict__ dout, const T* __restrict__ y, const T* __restrict__ out,
                             const T* __restrict__ addend, T* __restrict__ grad_out, T* __restrict__ dy,
                             BnBackwardParams<S> p, int64_t total) {
  const bool has_out = out != nullptr, has_add = addend != nullptr;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t ch = p.layout == Layout::NHWC ? i % p.c : (i / p.hw) % p.c;
    const int64_t n = i / (p.hw * p.c);
    const S ov = has_out ? Cvt<T>::to(out[i]) : S(0);
    S g0;
    const S v = apply_one<S>(Cvt<T>::to(dout[i]), Cvt<T>::to(y[i]), ov, ch, n, has_out, p, g0);
    if (grad_out != nullptr) grad_out[i] = Cvt<T>::from(g0);
    dy[i] = Cvt<T>::from(has_add ? v + Cvt<T>::to(addend[i]) : v);
  }
}

// 16-byte vectors of V elements, all pointers 16-byte aligned.
//   NHWC (C % V == 0): a vector is V consecutive channels of one pixel
//   NCHW (H*W % V == 0): a vector is V consecutive pixels of one (n, c) plane
template <typename T, typename S, int V, bool Nhwc>
__global__ void apply_vec(const T* __restrict__ dout, const T* __restrict__ y, const T* __restrict__ out,
                          const T* __restrict__ addend, T* __restrict__ grad_out, T* __restrict__ dy,
                          BnBackwardParams<S> p, int64_t total_vec) {
  using P = Pack<T, V>;
  static_assert(sizeof(P) == 16, "a pack is one 16-byte access");
  const bool has_out = out != nullptr, has_add = addend != nullptr;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total_vec; i += stride) {
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
    const P dv = reinterpret_cast<const P*>(dout)[i];
    const P yv = reinterpret_cast<const P*>(y)[i];
    P ov, av;
    if (has_out) ov = reinterpret_cast<const P*>(out)[i];
    if (has_add) av = reinterpret_cast<const P*>(addend)[i];
    P o, go;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t ch = Nhwc ? ch0 + j : ch0;
      const S os = has_out ? Cvt<T>::to(ov.v[j]) : S(0);
      S g0;
      const S v = apply_one<S>(Cvt<T>::to(dv.v[j]), Cvt<T>::to(yv.v[j]), os, ch, n, has_out, p, g0);
      go.v[j] = Cvt<T>::from(g0);
      o.v[j] = Cvt<T>::from(has_add ? v + Cvt<T>::to(av.v[j]) : v);
    }
    if (grad_out != nullptr) reinterpret_cast<P*>(grad_out)[i] = go;
    reinterpret_cast<P*>(dy)[i] = o;
  }
}

template <typename T>
__device__ __forceinline__ T act_grad_one(T d, T o) {
  using C = decltype(Cvt<T>::to(o));
  return Cvt<T>::to(o) <= C(0) ? Cvt<T>::from(C(0)) : d;  // NaN out keeps dout, like torch.where
}

template <typename T>
__global__ void act_grad_scalar(const T* __restrict__ dout, const T* __restrict__ out, T* __restrict__ dx,
                                int64_t begin, int64_t total) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = begin + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    dx[i] = act_grad_one(dout[i], out[i]);
}

template <typename T, int V>
__global__ void act_grad_vec(const T* __restrict__ dout, const T* __restrict__ out, T* __restrict__ dx,
                             int64_t total_vec) {
  using P = Pack<T, V>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total_vec; i += stride) {
    const P d = reinterpret_cast<const P*>(dout)[i];
    const P o = reinterpret_cast<const P*>(out)[i];
    P r;
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = act_grad_one(d.v[j], o.v[j]);
    reinterpret_cast<P*>(dx)[i] = r;
  }
}

}  // namespace

template <typename S>
cudaError_t bn_backward_coefs_cuda(const BnBackwardParams<S>& p, const S* sum_g, const S* sum_gx, S* coefs,
                                   cudaStream_t stream) {
  if (p.c == 0) return cudaSuccess;
  coefs_kernel<S><<<static_cast<unsigned>((p.c + 127) / 128), 128, 0, stream>>>(p, sum_g, sum_gx, coefs);
  return cudaGetLastError();
}

template <typename T, typename S>
cudaError_t bn_backward_apply_cuda(const T* dout, const T* y, const T* out, const T* addend, T* grad_out, T* dy,
                                   const BnBackwardParams<S>& p, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const int64_t total = p.n * p.c * p.hw;
  if (total == 0) return cudaSuccess;
  const bool vec_ok = aligned16(dout) && aligned16(y) && aligned16(out) && aligned16(addend) && aligned16(grad_out) &&
                      aligned16(dy);
  const int grid_vec = grid_for(total / V, kThreads);
  if (vec_ok && p.layout == Layout::NHWC && p.c % V == 0) {
    apply_vec<T, S, V, true><<<grid_vec, kThreads, 0, stream>>>(dout, y, out, addend, grad_out, dy, p, total / V);
  } else if (vec_ok && p.layout == Layout::NCHW && p.hw % V == 0) {
    apply_vec<T, S, V, false><<<grid_vec, kThreads, 0, stream>>>(dout, y, out, addend, grad_out, dy, p, total / V);
  } else {
    apply_scalar<T, S><<<grid_for(total, kThreads), kThreads, 0, stream>>>(dout, y, out, addend, grad_out, dy, p,
                                                                            total);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t act_grad_cuda(const T* dout, const T* out, T* dx, int64_t total, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  if (total == 0) return cudaSuccess;
  int64_t done = 0;
  if (aligned16(dout) && aligned16(out) && aligned16(dx) && total >= V) {
    const int64_t total_vec = total / V;
    act_grad_vec<T, V><<<grid_for(total_vec, kThreads), kThreads, 0, stream>>>(dout, out, dx, total_vec);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    done = total_vec * V;
  }
  if (done < total)
    act_grad_scalar<T><<<grid_for(total - done, kThreads), kThreads, 0, stream>>>(dout, out, dx, done, total);
  return cudaGetLastError();
}

#define FUSEDRES_BN_BACKWARD_CUDA(T, S)                                                                     \
  template cudaError_t bn_backward_apply_cuda<T, S>(const T*, const T*, const T*, const T*, T*, T*,         \
                                                    const BnBackwardParams<S>&, cudaStream_t);              \
  template cudaError_t act_grad_cuda<T>(const T*, const T*, T*, int64_t, cudaStream_t);
FUSEDRES_BN_BACKWARD_CUDA(float, float)
FUSEDRES_BN_BACKWARD_CUDA(double, double)
FUSEDRES_BN_BACKWARD_CUDA(__half, float)
FUSEDRES_BN_BACKWARD_CUDA(__nv_bfloat16, float)
#undef FUSEDRES_BN_BACKWARD_CUDA

template cudaError_t bn_backward_coefs_cuda<float>(const BnBackwardParams<float>&, const float*, const float*, float*,
                                                   cudaStream_t);
template cudaError_t bn_backward_coefs_cuda<double>(const BnBackwardParams<double>&, const double*, const double*,
                                                    double*, cudaStream_t);

}  // namespace fusedres
