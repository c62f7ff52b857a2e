// CUDA kernels of the BatchNorm reductions: batch_stats (per-tile count, mean, M2 per
// channel) and bn_backward_reduce (per-channel sum g and sum g*xhat). Two launches each,
// no atomics:
//   1. one CTA per block of rows (NHWC: times a group of channels, NCHW: times one channel)
//      writes that block's per-channel result to its own workspace slot;
//   2. one thread per (tile,) channel merges the slots in block order, in double.
// Inside a CTA every sum has a fixed shape (sequential per thread, then a fixed tree), and a
// thread's values are the same whether they arrive as one 16-byte vector or one element at
// a time (the scalar path, for unaligned pointers or sizes that are not a multiple of the
// vector width, loads the same V values one by one), so results are bitwise reproducible
// and do not depend on alignment. The block shape depends on the tensor shape and dtype only.
//
// NHWC: a thread owns V = 16/sizeof(T) consecutive channels; a CTA is TX x TY = 256 threads,
//   TX = min(32, the power of two >= C/V) along channels, TY along rows. batch_stats keeps a
//   chunk of kRpt rows per thread in registers for a two-pass mean/M2 per chunk and
//   Chan-merges its kChunks chunks; the reduce streams kRowsReduce rows per thread.
// NCHW: a CTA of 256 threads covers one channel over a block of pixels; a thread owns V
//   consecutive pixels per step (one 16-byte vector when H*W % V == 0).
// Indexing is int64 throughout.
#include <climits>
#include <cmath>
#include <cstdint>

#include "bn_cuda.cuh"
#include "chan_merge.h"
#include "cuda_common.cuh"

namespace fusedres {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kRpt = 8;                 // batch_stats NHWC: rows per thread per chunk (kept in registers)
constexpr int kChunks = 4;              // batch_stats: chunks per CTA
constexpr int kStepsNchw = 2;           // batch_stats NCHW: vector steps per thread per chunk
constexpr int kRowsReduce = 32;         // reduce NHWC: rows per thread
constexpr int kStepsReduceNchw = 8;     // reduce NCHW: vector steps per thread

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block decomposition shared by the launcher and the kernels.
struct Geom {
  int64_t n = 0, c = 0, hw = 0, m = 0, tiles = 1;
  int64_t rows = 1;      // rows (pixels) per block
  int64_t chunk = 1;     // rows per chunk (batch_stats) = rows / kChunks
  int64_t per_tile = 1;  // blocks per tile
  int tx = 1, ty = 1;    // CTA shape (NHWC); NCHW: kThreads x 1
};

template <typename T>
Geom make_geom(int64_t n, int64_t c, int64_t hw, Layout layout, int64_t tiles, bool stats) {
  constexpr int V = kVec<T>;
  Geom g;
  g.n = n;
  g.c = c;
  g.hw = hw;
  g.m = n * hw;
  g.tiles = tiles;
  if (layout == Layout::NHWC) {
    const int64_t cv = cdiv(c, V);
    int tx = 1;
    while (tx < 32 && tx < cv) tx <<= 1;
    g.tx = tx;
    g.ty = kThreads / tx;
    g.chunk = int64_t(g.ty) * kRpt;
    g.rows = stats ? g.chunk * kChunks : int64_t(g.ty) * kRowsReduce;
  } else {
    g.tx = kThreads;
    g.ty = 1;
    g.chunk = int64_t(kThreads) * V * kStepsNchw;
    g.rows = stats ? g.chunk * kChunks : int64_t(kThreads) * V * kStepsReduceNchw;
  }
  const int64_t longest = cdiv(g.m, tiles);
  g.per_tile = longest > g.rows ? cdiv(longest, g.rows) : 1;
  return g;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Rows [r0, r1) of block `blk` (tile blk / per_tile).
__device__ __forceinline__ void block_rows(const Geom& g, int64_t blk, int64_t& r0, int64_t& r1) {
  const int64_t t = blk / g.per_tile, j = blk % g.per_tile;
  const int64_t tb = stats_tile_begin(g.m, g.tiles, t), te = stats_tile_begin(g.m, g.tiles, t + 1);
  r0 = min64(te, tb + j * g.rows);
  r1 = min64(te, r0 + g.rows);
}

// V consecutive channels c0.. of NHWC row r (0 beyond C). Vec: C % V == 0, 16-byte aligned.
template <typename T, typename S, int V, bool Vec>
__device__ __forceinline__ void load_channels(const T* __restrict__ p, int64_t r, int64_t c0, int64_t C, S (&v)[V]) {
  const T* q = p + r * C + c0;
  if (Vec) {
    const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(q);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = Cvt<T>::to(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = c0 + j < C ? Cvt<T>::to(q[j]) : S(0);
  }
}

// V consecutive pixels m0.. of NCHW channel ch (0 at pixels >= e); ns: each pixel's sample.
// Vec: m0, e and H*W multiples of V (a vector never straddles two samples), 16-byte aligned.
template <typename T, typename S, int V, bool Vec>
__device__ __forceinline__ void load_pixels(const T* __restrict__ p, int64_t m0, int64_t e, int64_t ch, int64_t C,
                                            int64_t hw, S (&v)[V], int64_t (&ns)[V]) {
  if (Vec) {
    const int64_t n = m0 / hw;
    if (m0 < e) {
      const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p + (n * C + ch) * hw + (m0 - n * hw));
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = Cvt<T>::to(pk.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = S(0);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) ns[j] = n;
  } else {
    // one 64-bit division per call (a called subroutine on the GPU, whose calling convention
    // made the kernel spill when it ran per element); the sample advances at each H*W wrap
    int64_t n = m0 / hw, rem = m0 - n * hw;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t m = m0 + j;
      ns[j] = n;
      v[j] = m < e ? Cvt<T>::to(p[(n * C + ch) * hw + rem]) : S(0);
      if (++rem == hw) {
        rem = 0;
        ++n;
      }
    }
  }
}

// Sum over the TY threads of a column (2-D CTA), fixed tree; every thread gets the total.
template <typename S, int V>
__device__ __forceinline__ void column_sum(S (&a)[V], S* red) {
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  S* mine = red + (ty * TX + tx) * V;
#pragma unroll
  for (int j = 0; j < V; ++j) mine[j] = a[j];
  __syncthreads();
  for (int s = TY / 2; s > 0; s >>= 1) {
    if (ty < s) {
      const S* other = red + ((ty + s) * TX + tx) * V;
#pragma unroll
      for (int j = 0; j < V; ++j) mine[j] += other[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < V; ++j) a[j] = red[tx * V + j];
  __syncthreads();
}

// Sum over the kThreads threads of a 1-D CTA, fixed tree; every thread gets the total.
template <typename S>
__device__ __forceinline__ S cta_sum(S v, S* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  S t = S(0);
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) t += red[w];
  __syncthreads();
  return t;
}

// Chan merge of (nb, mb, m2b) into (n, mean, m2), the mean as a weighted sum (chan_merge.h).
__device__ __forceinline__ void chan_merge(double& n, double& mean, double& m2, double nb, double mb, double m2b) {
  if (nb <= 0.0) return;
  if (n == 0.0) {
    n = nb;
    mean = mb;
    m2 = m2b;
    return;
  }
  const double tot = n + nb, delta = mb - mean;
  m2 += m2b + delta * delta * n * nb / tot;
  mean = (n * mean + nb * mb) / tot;
  n = tot;
}

// ------------------------------------------------------------------------ batch_stats

template <typename T, typename S, bool Vec>
__global__ void __launch_bounds__(kThreads) stats_nhwc(const T* __restrict__ x, S* __restrict__ work, Geom g) {
  constexpr int V = kVec<T>;
  __shared__ S red[kThreads * V];
  const int64_t blk = blockIdx.x;
  int64_t r0, r1;
  block_rows(g, blk, r0, r1);
  // the block's length as a 32-bit count (at most g.rows): one register fewer to keep across
  // the division subroutines of the chunk loop, which made the fp32 scalar path spill
  const int len = static_cast<int>(r1 - r0), chunk_rows = static_cast<int>(g.chunk);
  const int64_t C = g.c;
  const int64_t c0 = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const bool own = c0 < C;
  const int ty = threadIdx.y, TY = blockDim.y;
  double n = 0.0, mean[V], m2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mean[j] = m2[j] = 0.0;
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    const int64_t cr0 = r0 + int64_t(chunk) * chunk_rows;
    const int cnt = min(len - chunk * chunk_rows, chunk_rows);
    if (cnt <= 0) break;  // the same for the whole CTA
    const double rcnt = 1.0 / double(cnt);  // before the loads, while few registers are live
    S v[kRpt][V], s[V];
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] = S(0);
#pragma unroll
    for (int k = 0; k < kRpt; ++k) {
      const int64_t r = cr0 + ty + int64_t(k) * TY;
      if (own && r < cr0 + cnt) {
        load_channels<T, S, V, Vec>(x, r, c0, C, v[k]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[k][j] = S(0);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) s[j] += v[k][j];
    }
    column_sum<S, V>(s, red);
    S cm[V], q[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      cm[j] = div_by_count(s[j], double(cnt), rcnt);
      q[j] = S(0);
    }
#pragma unroll
    for (int k = 0; k < kRpt; ++k) {
      const int64_t r = cr0 + ty + int64_t(k) * TY;
      if (r < cr0 + cnt) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const S d = v[k][j] - cm[j];
          q[j] += d * d;
        }
      }
    }
    column_sum<S, V>(q, red);
    const double nn = n;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      double cn = nn, mj = mean[j], qj = m2[j];
      chan_merge(cn, mj, qj, double(cnt), double(cm[j]), double(q[j]));
      mean[j] = mj;
      m2[j] = qj;
    }
    n = nn + double(cnt);
  }
  if (ty == 0 && own) {
    S* slot = work + blk * 3 * C;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = c0 + j;
      if (c < C) {
        slot[c] = S(n);
        slot[C + c] = S(mean[j]);
        slot[2 * C + c] = S(m2[j]);
      }
    }
  }
}

template <typename T, typename S, bool Vec>
__global__ void __launch_bounds__(kThreads) stats_nchw(const T* __restrict__ x, S* __restrict__ work, Geom g) {
  constexpr int V = kVec<T>;
  __shared__ S red[kThreads / 32];
  const int64_t item = blockIdx.x;
  const int64_t blk = item / g.c, ch = item % g.c;
  int64_t r0, r1;
  block_rows(g, blk, r0, r1);
  const int len = static_cast<int>(r1 - r0), chunk_rows = static_cast<int>(g.chunk);  // as in stats_nhwc
  const int tid = threadIdx.x;
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    const int64_t cr0 = r0 + int64_t(chunk) * chunk_rows;
    const int cnt = min(len - chunk * chunk_rows, chunk_rows);
    if (cnt <= 0) break;  // the same for the whole CTA
    const int64_t e = cr0 + cnt;
    S v[kStepsNchw][V], s = S(0);
    int64_t ns[V];
#pragma unroll
    for (int k = 0; k < kStepsNchw; ++k) {
      const int64_t m0 = cr0 + (int64_t(k) * kThreads + tid) * V;
      load_pixels<T, S, V, Vec>(x, m0, e, ch, g.c, g.hw, v[k], ns);
#pragma unroll
      for (int j = 0; j < V; ++j) s += v[k][j];
    }
    s = cta_sum(s, red);
    const S cm = s / S(cnt);
    S q = S(0);
#pragma unroll
    for (int k = 0; k < kStepsNchw; ++k) {
      const int64_t m0 = cr0 + (int64_t(k) * kThreads + tid) * V;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (m0 + j < e) {
          const S d = v[k][j] - cm;
          q += d * d;
        }
      }
    }
    q = cta_sum(q, red);
    chan_merge(n, mean, m2, double(cnt), double(cm), double(q));
  }
  if (tid == 0) {
    S* slot = work + blk * 3 * g.c;
    slot[ch] = S(n);
    slot[g.c + ch] = S(mean);
    slot[2 * g.c + ch] = S(m2);
  }
}

// One thread per (tile, channel): the tile's blocks in order -> partials.
template <typename S>
__global__ void stats_merge(const S* __restrict__ work, S* __restrict__ partials, Geom g) {
  const int64_t total = g.tiles * g.c;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t t = i / g.c, c = i % g.c;
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int64_t j = 0; j < g.per_tile; ++j) {
      const S* slot = work + (t * g.per_tile + j) * 3 * g.c;
      chan_merge(n, mean, m2, double(slot[c]), double(slot[g.c + c]), double(slot[2 * g.c + c]));
    }
    S* out = partials + t * 3 * g.c;
    out[c] = S(n);
    out[g.c + c] = n > 0.0 ? S(mean) : S(NAN);
    out[2 * g.c + c] = S(m2);
  }
}

// ----------------------------------------------------------------- bn_backward_reduce

template <typename T, typename S, bool Vec>
__global__ void __launch_bounds__(kThreads)
    reduce_nhwc(const T* __restrict__ dout, const T* __restrict__ y, const T* __restrict__ out, BnBackwardParams<S> p,
                S* __restrict__ work, Geom g) {
  constexpr int V = kVec<T>;
  __shared__ S red[kThreads * V];
  const int64_t blk = blockIdx.x;
  int64_t r0, r1;
  block_rows(g, blk, r0, r1);
  // the block's length as a 32-bit count (at most g.rows): one register fewer to keep across
  // the division subroutines of the chunk loop, which made the fp32 scalar path spill
  const int len = static_cast<int>(r1 - r0), chunk_rows = static_cast<int>(g.chunk);
  const int64_t C = g.c;
  const int64_t c0 = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const bool own = c0 < C;
  const bool has_out = out != nullptr, sample = p.sample_scale != nullptr;
  S sc[V], sh[V], mu[V], inv[V], ag[V], agx[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const bool ok = c0 + j < C;
    sc[j] = ok ? p.scale[c0 + j] : S(0);
    sh[j] = ok ? p.shift[c0 + j] : S(0);
    mu[j] = ok ? p.mean[c0 + j] : S(0);
    inv[j] = ok ? p.invstd[c0 + j] : S(0);
    ag[j] = agx[j] = S(0);
  }
  if (own) {
    for (int k = 0; k < kRowsReduce; ++k) {
      const int64_t r = r0 + threadIdx.y + int64_t(k) * blockDim.y;
      if (r >= r1) break;
      S d[V], yv[V], ov[V];
      load_channels<T, S, V, Vec>(dout, r, c0, C, d);
      load_channels<T, S, V, Vec>(y, r, c0, C, yv);
      if (has_out) {
        load_channels<T, S, V, Vec>(out, r, c0, C, ov);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) ov[j] = S(0);
      }
      const S kk = sample ? p.sample_scale[r / g.hw] : S(1);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const S gv = bn_grad(d[j], yv[j], ov[j], sc[j], sh[j], kk, p.relu, has_out, sample);
        ag[j] += gv;
        agx[j] += gv * ((yv[j] - mu[j]) * inv[j]);
      }
    }
  }
  column_sum<S, V>(ag, red);
  column_sum<S, V>(agx, red);
  if (threadIdx.y == 0 && own) {
    S* slot = work + blk * 2 * C;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (c0 + j < C) {
        slot[c0 + j] = ag[j];
        slot[C + c0 + j] = agx[j];
      }
    }
  }
}

template <typename T, typename S, bool Vec>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw(const T* __restrict__ dout, const T* __restrict__ y, const T* __restrict__ out, BnBackwardParams<S> p,
                S* __restrict__ work, Geom g) {
  constexpr int V = kVec<T>;
  __shared__ S red[kThreads / 32];
  const int64_t item = blockIdx.x;
  const int64_t blk = item / g.c, ch = item % g.c;
  int64_t r0, r1;
  block_rows(g, blk, r0, r1);
  const bool has_out = out != nullptr, sample = p.sample_scale != nullptr;
  const S sc = p.scale[ch], sh = p.shift[ch], mu = p.mean[ch], inv = p.invstd[ch];
  S ag = S(0), agx = S(0);
  for (int k = 0; k < kStepsReduceNchw; ++k) {
    const int64_t m0 = r0 + (int64_t(k) * kThreads + threadIdx.x) * V;
    if (m0 >= r1) break;
    S d[V], yv[V], ov[V];
    int64_t ns[V];
    load_pixels<T, S, V, Vec>(dout, m0, r1, ch, g.c, g.hw, d, ns);
    load_pixels<T, S, V, Vec>(y, m0, r1, ch, g.c, g.hw, yv, ns);
    if (has_out) {
      load_pixels<T, S, V, Vec>(out, m0, r1, ch, g.c, g.hw, ov, ns);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) ov[j] = S(0);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (m0 + j < r1) {
        const S kk = sample ? p.sample_scale[ns[j]] : S(1);
        const S gv = bn_grad(d[j], yv[j], ov[j], sc, sh, kk, p.relu, has_out, sample);
        ag += gv;
        agx += gv * ((yv[j] - mu) * inv);
      }
    }
  }
  ag = cta_sum(ag, red);
  agx = cta_sum(agx, red);
  if (threadIdx.x == 0) {
    S* slot = work + blk * 2 * g.c;
    slot[ch] = ag;
    slot[g.c + ch] = agx;
  }
}

// One thread per channel: the blocks in order, in double -> sum_g, sum_gx.
template <typename S>
__global__ void reduce_merge(const S* __restrict__ work, BnBackwardParams<S> p, Geom g) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < g.c; c += stride) {
    double a = 0.0, b = 0.0;
    for (int64_t blk = 0; blk < g.per_tile; ++blk) {
      a += double(work[blk * 2 * g.c + c]);
      b += double(work[blk * 2 * g.c + g.c + c]);
    }
    p.sum_g[c] = S(a);
    p.sum_gx[c] = S(b);
  }
}

// NCHW 16-byte vectors need every tile (block, chunk) boundary and H*W to be multiples of V.
template <typename T>
bool nchw_vec_ok(int64_t m, int64_t hw, int64_t tiles) {
  constexpr int V = kVec<T>;
  return hw % V == 0 && (tiles == 1 || (m % tiles == 0 && (m / tiles) % V == 0));
}

}  // namespace

template <typename T, typename S>
size_t batch_stats_cuda_workspace(const BatchStatsParams<S>& p) {
  if (p.tiles <= 0) return 0;
  const Geom g = make_geom<T>(p.n, p.c, p.hw, p.layout, p.tiles, true);
  return static_cast<size_t>(p.tiles * g.per_tile * 3 * p.c) * sizeof(S);
}

template <typename T, typename S>
cudaError_t batch_stats_cuda(const T* x, const BatchStatsParams<S>& p, void* workspace, cudaStream_t stream) {
  if (p.tiles <= 0) return cudaErrorInvalidValue;
  if (p.c == 0) return cudaSuccess;
  constexpr int V = kVec<T>;
  const Geom g = make_geom<T>(p.n, p.c, p.hw, p.layout, p.tiles, true);
  S* work = static_cast<S*>(workspace);
  const int64_t blocks = p.tiles * g.per_tile;
  if (p.layout == Layout::NHWC) {
    const int64_t groups = cdiv(cdiv(p.c, V), g.tx);
    if (blocks > INT_MAX || groups > 65535) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(groups)), cta(g.tx, g.ty);
    if (aligned16(x) && p.c % V == 0) {
      stats_nhwc<T, S, true><<<grid, cta, 0, stream>>>(x, work, g);
    } else {
      stats_nhwc<T, S, false><<<grid, cta, 0, stream>>>(x, work, g);
    }
  } else {
    const int64_t items = blocks * p.c;
    if (items > INT_MAX) return cudaErrorInvalidConfiguration;
    if (aligned16(x) && nchw_vec_ok<T>(g.m, p.hw, p.tiles)) {
      stats_nchw<T, S, true><<<static_cast<unsigned>(items), kThreads, 0, stream>>>(x, work, g);
    } else {
      stats_nchw<T, S, false><<<static_cast<unsigned>(items), kThreads, 0, stream>>>(x, work, g);
    }
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  stats_merge<S><<<grid_for(p.tiles * p.c, 128), 128, 0, stream>>>(work, p.partials, g);
  return cudaGetLastError();
}

template <typename T, typename S>
size_t bn_backward_reduce_cuda_workspace(const BnBackwardParams<S>& p) {
  const Geom g = make_geom<T>(p.n, p.c, p.hw, p.layout, 1, false);
  return static_cast<size_t>(g.per_tile * 2 * p.c) * sizeof(S);
}

template <typename T, typename S>
cudaError_t bn_backward_reduce_cuda(const T* dout, const T* y, const T* out, const BnBackwardParams<S>& p,
                                    void* workspace, cudaStream_t stream) {
  if (p.c == 0) return cudaSuccess;
  constexpr int V = kVec<T>;
  const Geom g = make_geom<T>(p.n, p.c, p.hw, p.layout, 1, false);
  S* work = static_cast<S*>(workspace);
  const bool aligned = aligned16(dout) && aligned16(y) && aligned16(out);
  if (p.layout == Layout::NHWC) {
    const int64_t groups = cdiv(cdiv(p.c, V), g.tx);
    if (g.per_tile > INT_MAX || groups > 65535) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(g.per_tile), static_cast<unsigned>(groups)), cta(g.tx, g.ty);
    if (aligned && p.c % V == 0) {
      reduce_nhwc<T, S, true><<<grid, cta, 0, stream>>>(dout, y, out, p, work, g);
    } else {
      reduce_nhwc<T, S, false><<<grid, cta, 0, stream>>>(dout, y, out, p, work, g);
    }
  } else {
    const int64_t items = g.per_tile * p.c;
    if (items > INT_MAX) return cudaErrorInvalidConfiguration;
    if (aligned && nchw_vec_ok<T>(g.m, p.hw, 1)) {
      reduce_nchw<T, S, true><<<static_cast<unsigned>(items), kThreads, 0, stream>>>(dout, y, out, p, work, g);
    } else {
      reduce_nchw<T, S, false><<<static_cast<unsigned>(items), kThreads, 0, stream>>>(dout, y, out, p, work, g);
    }
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reduce_merge<S><<<grid_for(p.c, 128), 128, 0, stream>>>(work, p, g);
  return cudaGetLastError();
}

#define FUSEDRES_BN_REDUCE_CUDA(T, S)                                                                         \
  template size_t batch_stats_cuda_workspace<T, S>(const BatchStatsParams<S>&);                               \
  template cudaError_t batch_stats_cuda<T, S>(const T*, const BatchStatsParams<S>&, void*, cudaStream_t);      \
  template size_t bn_backward_reduce_cuda_workspace<T, S>(const BnBackwardParams<S>&);                        \
  template cudaError_t bn_backward_reduce_cuda<T, S>(const T*, const T*, const T*, const BnBackwardParams<S>&, \
                                                     void*, cudaStream_t);
FUSEDRES_BN_REDUCE_CUDA(float, float)
FUSEDRES_BN_REDUCE_CUDA(double, double)
FUSEDRES_BN_REDUCE_CUDA(__half, float)
FUSEDRES_BN_REDUCE_CUDA(__nv_bfloat16, float)
#undef FUSEDRES_BN_REDUCE_CUDA

}  // namespace fusedres
