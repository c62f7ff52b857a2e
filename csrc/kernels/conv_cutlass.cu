// Launchers of conv_cutlass.h: the support check, the per-dtype dispatch to the CUTLASS
// instantiations (conv_*_{f16,bf16}.cu; the Hopper-native forward, conv_fprop_sm90*_bf16.cu,
// when asked for and on an sm_90 device), and the two small hand-written kernels around them:
//
//  - the wgrad split-K reduction: dw = sum of the float32 slices in slice order, rounded once
//    to the storage type, written KRSC or KCRS;
//  - the per-channel statistics of a conv output (conv_stats): fixed row tiles of
//    kConvStatsTileRows, each thread owning 8 channels (one 16-byte load per row) and a
//    strided subset of the tile's rows: sum -> mean, then M2 = sum (v - mean)^2 over the same
//    rows (from cache); the 8 row groups of a block are Chan-merged in order into the tile's
//    (count, mean, M2); a second kernel merges the tiles of each channel in tile order in
//    float64. Deterministic (no atomics, the order depends on the shape only); the
//    two-pass per-thread M2 avoids E[x^2] - E[x]^2 cancellation.
//
// Torch-free. Everything is enqueued on the caller's stream; nothing synchronises the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "conv_cutlass.h"
#include "conv_cutlass_impl.h"

#ifdef FUSEDRES_WITH_CUTLASS
#include <cutlass/version.h>
#endif

namespace fusedres {

const char* conv_status_string(ConvStatus s) {
  switch (s) {
    case ConvStatus::kOk:
      return "ok";
    case ConvStatus::kUnsupported:
      return "shape or arguments not supported by the CUTLASS kernels";
    case ConvStatus::kLaunchError:
      return "CUDA error while configuring or launching the kernel";
    case ConvStatus::kNotBuilt:
      return "compiled without CUTLASS";
  }
  return "unknown status";
}

bool conv_cutlass_built() {
#ifdef FUSEDRES_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

bool conv_sm90_built() {
#if defined(FUSEDRES_WITH_CUTLASS) && defined(FUSEDRES_WITH_CUTLASS_SM90)
  return true;
#else
  return false;
#endif
}

#ifdef FUSEDRES_WITH_CUTLASS
#define FUSEDRES_STR2(x) #x
#define FUSEDRES_STR(x) FUSEDRES_STR2(x)
const char* conv_cutlass_description() {
  return "CUTLASS " FUSEDRES_STR(CUTLASS_MAJOR) "." FUSEDRES_STR(CUTLASS_MINOR) "." FUSEDRES_STR(
      CUTLASS_PATCH) " Sm80 tensor-op implicit GEMM: fprop (+bias/residual/ReLU epilogue), grouped fprop (+bias/ReLU), "
                     "fprop and wgrad with "
                     "the BatchNorm+ReLU prologue, dgrad (unity-stride and strided), split-K wgrad; "
                     "float16/bfloat16 NHWC"
#ifdef FUSEDRES_WITH_CUTLASS_SM90
                     "; Sm90 TMA + wgmma fprop (+bias/residual/ReLU visitor tree), bfloat16, on request"
#endif
      ;
}
#else
const char* conv_cutlass_description() { return ""; }
#endif

namespace {

// 16-bit storage <-> float
template <typename T>
struct Cvt;
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

// V elements read as one 16-byte access
template <typename T, int V>
struct alignas(16) Pack {
  T v[V];
};

int grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 8));
}

bool aligned(const void* q, uintptr_t bytes) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % bytes == 0; }

ConvStatus from_cuda(cudaError_t e) { return e == cudaSuccess ? ConvStatus::kOk : ConvStatus::kLaunchError; }

// The current device is compute capability 9.0, the one the sm_90a code runs on (cached per
// thread for the last device asked about).
bool current_device_is_sm90() {
  thread_local int last_dev = -1;
  thread_local bool last = false;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev != last_dev) {
    int major = 0, minor = 0;
    last = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess && major == 9 &&
           minor == 0;
    last_dev = dev;
  }
  return last;
}

// ------------------------------------------------------------------ wgrad split-K reduction

template <typename T>
__global__ void wgrad_reduce_kernel(const float* __restrict__ ws, T* __restrict__ dw, int slices, int64_t k,
                                    int64_t rs, int64_t c, bool kcrs) {
  const int64_t total = k * rs * c;  // one slice, KRSC order
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    float acc = 0.f;
    for (int j = 0; j < slices; ++j) acc += ws[j * total + i];  // slice order: deterministic
    int64_t o = i;
    if (kcrs) {
      const int64_t ch = i % c, pos = (i / c) % rs, kk = i / (c * rs);
      o = (kk * c + ch) * rs + pos;
    }
    dw[o] = Cvt<T>::from(acc);
  }
}

// ------------------------------------------------------------------------- statistics

constexpr int kStatLanes = 32;  // threads along channels (8 channels each)
constexpr int kStatRows = 8;    // row groups per block
constexpr int kStatVec = 8;     // channels per thread: one 16-byte load of a 16-bit type

struct Moments {
  float n, mean, m2;
};

// Chan's merge; the mean as a weighted sum (as fusedres.reference.merge_partials does).
template <typename S>
__device__ __forceinline__ void chan_merge(S& n, S& mean, S& m2, S nb, S mb, S m2b) {
  if (nb <= S(0)) return;
  const S tot = n + nb;
  const S delta = mb - mean;
  m2 = m2 + m2b + delta * delta * n * nb / tot;
  mean = (n * mean + nb * mb) / tot;
  n = tot;
}

template <typename T>
__global__ void __launch_bounds__(kStatLanes* kStatRows)
    stats_tiles_kernel(const T* __restrict__ y, int64_t m, int64_t k, float* __restrict__ tiles_out) {
  __shared__ Moments part[kStatRows][kStatLanes][kStatVec];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * kStatLanes + tx) * kStatVec;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kConvStatsTileRows;
  const int64_t r1 = r0 + kConvStatsTileRows < m ? r0 + kConvStatsTileRows : m;
  float sum[kStatVec], m2[kStatVec];
  int cnt = 0;
#pragma unroll
  for (int j = 0; j < kStatVec; ++j) sum[j] = m2[j] = 0.f;
  const bool active = c0 < k;
  if (active) {
    for (int64_t r = r0 + ty; r < r1; r += kStatRows) {
      const auto v = *reinterpret_cast<const Pack<T, kStatVec>*>(y + r * k + c0);
#pragma unroll
      for (int j = 0; j < kStatVec; ++j) sum[j] += Cvt<T>::to(v.v[j]);
      ++cnt;
    }
  }
  float mean[kStatVec];
#pragma unroll
  for (int j = 0; j < kStatVec; ++j) mean[j] = cnt > 0 ? sum[j] / float(cnt) : 0.f;
  if (active) {
    for (int64_t r = r0 + ty; r < r1; r += kStatRows) {
      const auto v = *reinterpret_cast<const Pack<T, kStatVec>*>(y + r * k + c0);
#pragma unroll
      for (int j = 0; j < kStatVec; ++j) {
        const float d = Cvt<T>::to(v.v[j]) - mean[j];
        m2[j] += d * d;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kStatVec; ++j) part[ty][tx][j] = Moments{float(cnt), mean[j], m2[j]};
  __syncthreads();
  if (ty == 0 && active) {
    for (int j = 0; j < kStatVec; ++j) {
      Moments a = part[0][tx][j];
      for (int g = 1; g < kStatRows; ++g) {
        const Moments b = part[g][tx][j];
        chan_merge(a.n, a.mean, a.m2, b.n, b.mean, b.m2);
      }
      float* t = tiles_out + static_cast<int64_t>(blockIdx.x) * 3 * k;
      t[c0 + j] = a.n;
      t[k + c0 + j] = a.mean;
      t[2 * k + c0 + j] = a.m2;
    }
  }
}

constexpr int kMergeLanes = 32, kMergeSegments = 8;

__global__ void __launch_bounds__(kMergeLanes* kMergeSegments)
    stats_merge_kernel(const float* __restrict__ tiles_in, int64_t tiles, int64_t k, float* __restrict__ out) {
  __shared__ double part[kMergeSegments][kMergeLanes][3];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kMergeLanes + tx;
  const int64_t seg = (tiles + kMergeSegments - 1) / kMergeSegments;
  const int64_t t0 = ty * seg, t1 = t0 + seg < tiles ? t0 + seg : tiles;
  double n = 0, mean = 0, m2 = 0;
  if (c < k) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* p = tiles_in + t * 3 * k;
      chan_merge<double>(n, mean, m2, p[c], p[k + c], p[2 * k + c]);
    }
  }
  part[ty][tx][0] = n;
  part[ty][tx][1] = mean;
  part[ty][tx][2] = m2;
  __syncthreads();
  if (ty == 0 && c < k) {
    for (int g = 1; g < kMergeSegments; ++g) chan_merge<double>(n, mean, m2, part[g][tx][0], part[g][tx][1], part[g][tx][2]);
    out[c] = float(n);
    out[k + c] = float(mean);
    out[2 * k + c] = float(m2);
  }
}

template <typename T>
ConvStatus launch_stats(const void* y, int64_t m, int64_t k, float* partials, void* workspace, cudaStream_t stream) {
  const int64_t tiles = (m + kConvStatsTileRows - 1) / kConvStatsTileRows;
  float* ws = static_cast<float*>(workspace);
  const dim3 grid1(static_cast<unsigned>(tiles), static_cast<unsigned>((k + kStatLanes * kStatVec - 1) / (kStatLanes * kStatVec)));
  stats_tiles_kernel<T><<<grid1, dim3(kStatLanes, kStatRows), 0, stream>>>(static_cast<const T*>(y), m, k, ws);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return ConvStatus::kLaunchError;
  const dim3 grid2(static_cast<unsigned>((k + kMergeLanes - 1) / kMergeLanes));
  stats_merge_kernel<<<grid2, dim3(kMergeLanes, kMergeSegments), 0, stream>>>(ws, tiles, k, partials);
  return from_cuda(cudaGetLastError());
}

}  // namespace

// ------------------------------------------------------------------------------ fprop

ConvStatus conv_fprop_cutlass(const ConvFpropParams& p, cudaStream_t stream) {
#ifndef FUSEDRES_WITH_CUTLASS
  (void)p;
  (void)stream;
  return ConvStatus::kNotBuilt;
#else
  const bool prologue = p.in_scale != nullptr;
  const bool grouped = p.g.groups != 1;
  ConvCallFlags f;
  f.has_bias = p.bias != nullptr || p.bias_storage != nullptr;
  f.has_residual = p.residual != nullptr;
  f.input_relu = prologue;
  if (conv_cutlass_unsupported(prologue ? ConvKind::kFpropPrologue : ConvKind::kFprop, p.dtype, p.g, f) != nullptr)
    return ConvStatus::kUnsupported;
  if (prologue != (p.in_shift != nullptr) || p.x == nullptr || p.w == nullptr || p.y == nullptr)
    return ConvStatus::kUnsupported;
  // each kernel takes its bias in one form only
  if ((grouped && p.bias != nullptr) || (!grouped && p.bias_storage != nullptr)) return ConvStatus::kUnsupported;
  if (!aligned(p.x, 16) || !aligned(p.w, 16) || !aligned(p.y, 16) || !aligned(p.residual, 16) ||
      !aligned(p.bias, 32) || !aligned(p.bias_storage, 16) || !aligned(p.in_scale, 16) || !aligned(p.in_shift, 16))
    return ConvStatus::kUnsupported;
  const bool bf16 = p.dtype == ConvDtype::kBFloat16;
#ifdef FUSEDRES_WITH_CUTLASS_SM90
  if (p.hopper && bf16 && !grouped && !prologue && current_device_is_sm90()) {
    const ConvStatus st = p.residual != nullptr ? cutlass_conv::fprop_sm90_res_bf16(p, stream, false)
                                                : cutlass_conv::fprop_sm90_bf16(p, stream, false);
    if (st != ConvStatus::kUnsupported) return st;  // refused by CUTLASS 3.x: the Sm80 kernel runs it
  }
#endif
  if (grouped) return bf16 ? cutlass_conv::fprop_group_bf16(p, stream, false) : cutlass_conv::fprop_group_f16(p, stream, false);
  if (prologue)
    return bf16 ? cutlass_conv::fprop_fused_bf16(p, stream, false) : cutlass_conv::fprop_fused_f16(p, stream, false);
  return bf16 ? cutlass_conv::fprop_bf16(p, stream, false) : cutlass_conv::fprop_f16(p, stream, false);
#endif
}

// ------------------------------------------------------------------------------ dgrad

#ifdef FUSEDRES_WITH_CUTLASS
namespace {
// unit stride: CUTLASS's unity-stride dgrad; otherwise the strided dgrad
ConvStatus dgrad_dispatch(const ConvDgradParams& p, cudaStream_t stream, bool check_only) {
  const bool unity = p.g.stride_h == 1 && p.g.stride_w == 1;
  if (p.dtype == ConvDtype::kBFloat16)
    return unity ? cutlass_conv::dgrad_unity_bf16(p, stream, check_only) : cutlass_conv::dgrad_bf16(p, stream, check_only);
  return unity ? cutlass_conv::dgrad_unity_f16(p, stream, check_only) : cutlass_conv::dgrad_f16(p, stream, check_only);
}
}  // namespace
#endif

ConvStatus conv_dgrad_cutlass(const ConvDgradParams& p, cudaStream_t stream) {
#ifndef FUSEDRES_WITH_CUTLASS
  (void)p;
  (void)stream;
  return ConvStatus::kNotBuilt;
#else
  ConvCallFlags f;
  f.has_residual = p.addend != nullptr;
  if (conv_cutlass_unsupported(ConvKind::kDgrad, p.dtype, p.g, f) != nullptr) return ConvStatus::kUnsupported;
  if (p.dy == nullptr || p.w == nullptr || p.dx == nullptr || !aligned(p.dy, 16) || !aligned(p.w, 16) ||
      !aligned(p.dx, 16) || (p.addend != nullptr && !aligned(p.addend, 16)))
    return ConvStatus::kUnsupported;
  return dgrad_dispatch(p, stream, false);
#endif
}

// ------------------------------------------------------------------------------ wgrad

int conv_wgrad_split_k(const ConvGeometry& g) {
  const int64_t tiles = ((g.k + 127) / 128) * ((g.r * g.s * g.c + 127) / 128);
  const int64_t k_iters = (g.n * g.p * g.q + 31) / 32;  // 32 = the threadblock's GEMM-K step
  const int64_t target = kWgradSplitTargetCtas;
  int64_t s = tiles >= target ? 1 : target / std::max<int64_t>(tiles, 1);
  s = std::min<int64_t>(s, k_iters / 8);  // keep at least 8 main-loop steps per slice
  s = std::min<int64_t>(s, 64);
  // cap the float32 workspace at 256 MiB
  const int64_t slice_bytes = g.k * g.r * g.s * g.c * 4;
  if (slice_bytes > 0) s = std::min<int64_t>(s, (int64_t(256) << 20) / slice_bytes);
  return static_cast<int>(std::max<int64_t>(s, 1));
}

size_t conv_wgrad_workspace_bytes(const ConvGeometry& g, int split_k) {
  return static_cast<size_t>(std::max(split_k, 1)) * static_cast<size_t>(g.k * g.r * g.s * g.c) * sizeof(float);
}

ConvStatus conv_wgrad_cutlass(const ConvWgradParams& p, cudaStream_t stream) {
#ifndef FUSEDRES_WITH_CUTLASS
  (void)p;
  (void)stream;
  return ConvStatus::kNotBuilt;
#else
  const bool prologue = p.in_scale != nullptr;
  ConvCallFlags f;
  f.input_relu = prologue;
  if (conv_cutlass_unsupported(prologue ? ConvKind::kWgradPrologue : ConvKind::kWgrad, p.dtype, p.g, f) != nullptr)
    return ConvStatus::kUnsupported;
  if (prologue != (p.in_shift != nullptr) || p.split_k < 1 || p.dy == nullptr || p.x == nullptr ||
      p.dw == nullptr || p.workspace == nullptr)
    return ConvStatus::kUnsupported;
  if (!aligned(p.dy, 16) || !aligned(p.x, 16) || !aligned(p.workspace, 16) || !aligned(p.in_scale, 16) ||
      !aligned(p.in_shift, 16))
    return ConvStatus::kUnsupported;
  const bool bf16 = p.dtype == ConvDtype::kBFloat16;
  ConvStatus st;
  if (prologue)
    st = bf16 ? cutlass_conv::wgrad_fused_bf16(p, stream, false) : cutlass_conv::wgrad_fused_f16(p, stream, false);
  else
    st = bf16 ? cutlass_conv::wgrad_bf16(p, stream, false) : cutlass_conv::wgrad_f16(p, stream, false);
  if (st != ConvStatus::kOk) return st;
  const int64_t total = p.g.k * p.g.r * p.g.s * p.g.c;
  const int threads = 256;
  const int blocks = grid_for(total, threads);
  const float* ws = static_cast<const float*>(p.workspace);
  if (bf16)
    wgrad_reduce_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
        ws, static_cast<__nv_bfloat16*>(p.dw), p.split_k, p.g.k, p.g.r * p.g.s, p.g.c, p.dw_kcrs);
  else
    wgrad_reduce_kernel<__half><<<blocks, threads, 0, stream>>>(ws, static_cast<__half*>(p.dw), p.split_k, p.g.k,
                                                                p.g.r * p.g.s, p.g.c, p.dw_kcrs);
  return from_cuda(cudaGetLastError());
#endif
}

// ------------------------------------------------------------------------------ check

ConvStatus conv_cutlass_check(ConvKind kind, ConvDtype dtype, const ConvGeometry& g, const ConvCallFlags& flags,
                              int split_k) {
#ifndef FUSEDRES_WITH_CUTLASS
  (void)kind;
  (void)dtype;
  (void)g;
  (void)flags;
  (void)split_k;
  return ConvStatus::kNotBuilt;
#else
  if (conv_cutlass_unsupported(kind, dtype, g, flags) != nullptr) return ConvStatus::kUnsupported;
  const bool bf16 = dtype == ConvDtype::kBFloat16;
  ConvFpropParams fp;
  fp.g = g;
  fp.dtype = dtype;
  fp.relu = true;
  ConvDgradParams dp;
  dp.g = g;
  dp.dtype = dtype;
  ConvWgradParams wp;
  wp.g = g;
  wp.dtype = dtype;
  wp.split_k = split_k;
  using namespace cutlass_conv;
  switch (kind) {
    case ConvKind::kFprop:
      if (g.groups != 1) return bf16 ? fprop_group_bf16(fp, nullptr, true) : fprop_group_f16(fp, nullptr, true);
      return bf16 ? fprop_bf16(fp, nullptr, true) : fprop_f16(fp, nullptr, true);
    case ConvKind::kFpropPrologue:
      return bf16 ? fprop_fused_bf16(fp, nullptr, true) : fprop_fused_f16(fp, nullptr, true);
    case ConvKind::kDgrad:
      return dgrad_dispatch(dp, nullptr, true);
    case ConvKind::kWgrad:
      return bf16 ? wgrad_bf16(wp, nullptr, true) : wgrad_f16(wp, nullptr, true);
    case ConvKind::kWgradPrologue:
      return bf16 ? wgrad_fused_bf16(wp, nullptr, true) : wgrad_fused_f16(wp, nullptr, true);
  }
  return ConvStatus::kUnsupported;
#endif
}

ConvStatus conv_cutlass_check_sm90(ConvDtype dtype, const ConvGeometry& g, const ConvCallFlags& flags) {
#if !defined(FUSEDRES_WITH_CUTLASS) || !defined(FUSEDRES_WITH_CUTLASS_SM90)
  (void)dtype;
  (void)g;
  (void)flags;
  return ConvStatus::kNotBuilt;
#else
  if (conv_cutlass_unsupported(ConvKind::kFprop, dtype, g, flags) != nullptr) return ConvStatus::kUnsupported;
  if (dtype != ConvDtype::kBFloat16 || g.groups != 1) return ConvStatus::kUnsupported;
  ConvFpropParams fp;
  fp.g = g;
  fp.dtype = dtype;
  fp.relu = true;
  fp.hopper = true;
  // can_implement() looks at the geometry and alignment: any 16-byte aligned address will do
  alignas(16) static const char dummy[16] = {};
  fp.x = fp.w = dummy;
  fp.y = const_cast<char*>(dummy);
  if (flags.has_residual) {
    fp.residual = dummy;
    return cutlass_conv::fprop_sm90_res_bf16(fp, nullptr, true);
  }
  return cutlass_conv::fprop_sm90_bf16(fp, nullptr, true);
#endif
}

// ------------------------------------------------------------------------- statistics

size_t conv_stats_workspace_bytes(int64_t m, int64_t k) {
  const int64_t tiles = (m + kConvStatsTileRows - 1) / kConvStatsTileRows;
  return static_cast<size_t>(tiles * 3 * k) * sizeof(float);
}

ConvStatus conv_stats_nhwc(ConvDtype dtype, const void* y, int64_t m, int64_t k, float* partials, void* workspace,
                           cudaStream_t stream) {
  if (dtype == ConvDtype::kOther || m < 1 || k < 1 || k % kStatVec != 0 || y == nullptr || partials == nullptr ||
      workspace == nullptr || !aligned(y, 16) || (m + kConvStatsTileRows - 1) / kConvStatsTileRows > 0x7fffffff)
    return ConvStatus::kUnsupported;
  return dtype == ConvDtype::kBFloat16 ? launch_stats<__nv_bfloat16>(y, m, k, partials, workspace, stream)
                                       : launch_stats<__half>(y, m, k, partials, workspace, stream);
}

}  // namespace fusedres
