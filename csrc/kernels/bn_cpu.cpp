// CPU implementations of the kernels in bn_cpu.h. The inner loops are specialised at
// compile time on the storage type, the residual mode and the activation, run over
// contiguous memory and have no data-dependent branches (the ReLU is a select), so the
// compiler can vectorise them at -O3 (the 16-bit conversions need -fno-trapping-math,
// which the builds pass; results do not depend on it).
#include "bn_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "chan_merge.h"

namespace fusedres {
namespace {

template <typename S>
inline S ld(float v) {
  return static_cast<S>(v);
}
template <typename S>
inline S ld(double v) {
  return static_cast<S>(v);
}
template <typename S>
inline S ld(Half v) {
  return static_cast<S>(to_float(v));
}
template <typename S>
inline S ld(BFloat16 v) {
  return static_cast<S>(to_float(v));
}

inline void st(float& o, float v) { o = v; }
inline void st(double& o, double v) { o = v; }
inline void st(Half& o, float v) { o = half_from_float(v); }
inline void st(BFloat16& o, float v) { o = bfloat16_from_float(v); }

template <bool Relu, typename S>
inline S act(S z) {
  // torch.relu keeps NaN (NaN <= 0 is false); std::fmax would drop it
  if constexpr (Relu) return z <= S(0) ? S(0) : z;
  return z;
}

enum Residual : int { kNone = 0, kPlain = 1, kDual = 2 };

template <typename T>
constexpr bool kIs16Bit = std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>;

// 16-bit storage is processed in chunks widened to float first and narrowed at the end:
// the conversion loops and the arithmetic loop each vectorise on their own, the fused
// loop would not.
constexpr int64_t kChunk = 256;

template <typename T>
inline void widen(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
inline void narrow(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) st(dst[i], src[i]);
}

// One NHWC pixel: the channel changes with every element.
template <int R, bool Relu, typename T, typename S>
inline void pixel(const T* __restrict y, const T* __restrict r, T* __restrict o, int64_t c, const S* __restrict scale,
                  const S* __restrict shift, const S* __restrict rs, const S* __restrict rt, S k) {
  if constexpr (kIs16Bit<T>) {
    float yb[kChunk], rb[kChunk], ob[kChunk];
    for (int64_t b = 0; b < c; b += kChunk) {
      const int64_t len = c - b < kChunk ? c - b : kChunk;
      widen(y + b, yb, len);
      if constexpr (R != kNone) widen(r + b, rb, len);
      pixel<R, Relu, float, S>(yb, rb, ob, len, scale + b, shift + b, R == kDual ? rs + b : nullptr,
                               R == kDual ? rt + b : nullptr, k);
      narrow(ob, o + b, len);
    }
  } else {
    for (int64_t i = 0; i < c; ++i) {
      S z = (ld<S>(y[i]) * scale[i] + shift[i]) * k;
      if constexpr (R == kPlain) z += ld<S>(r[i]);
      if constexpr (R == kDual) z += ld<S>(r[i]) * rs[i] + rt[i];
      st(o[i], act<Relu>(z));
    }
  }
}

// One NCHW plane: every element shares the channel's coefficients.
template <int R, bool Relu, typename T, typename S>
inline void plane(const T* __restrict y, const T* __restrict r, T* __restrict o, int64_t hw, S scale, S shift, S rs,
                  S rt, S k) {
  if constexpr (kIs16Bit<T>) {
    float yb[kChunk], rb[kChunk], ob[kChunk];
    for (int64_t b = 0; b < hw; b += kChunk) {
      const int64_t len = hw - b < kChunk ? hw - b : kChunk;
      widen(y + b, yb, len);
      if constexpr (R != kNone) widen(r + b, rb, len);
      plane<R, Relu, float, S>(yb, rb, ob, len, scale, shift, rs, rt, k);
      narrow(ob, o + b, len);
    }
  } else {
    for (int64_t i = 0; i < hw; ++i) {
      S z = (ld<S>(y[i]) * scale + shift) * k;
      if constexpr (R == kPlain) z += ld<S>(r[i]);
      if constexpr (R == kDual) z += ld<S>(r[i]) * rs + rt;
      st(o[i], act<Relu>(z));
    }
  }
}

template <int R, bool Relu, typename T, typename S>
void rows(const T* y, const T* r, T* out, const BnAddActParams<S>& p, int64_t begin, int64_t end) {
  if (p.layout == Layout::NHWC) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t off = row * p.c;
      const S k = p.sample_scale != nullptr ? p.sample_scale[row / p.hw] : S(1);
      pixel<R, Relu>(y + off, R == kNone ? nullptr : r + off, out + off, p.c, p.scale, p.shift, p.res_scale,
                     p.res_shift, k);
    }
  } else {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t off = row * p.hw;
      const int64_t ch = row % p.c;
      const S k = p.sample_scale != nullptr ? p.sample_scale[row / p.c] : S(1);
      const S rs = R == kDual ? p.res_scale[ch] : S(0), rt = R == kDual ? p.res_shift[ch] : S(0);
      plane<R, Relu>(y + off, R == kNone ? nullptr : r + off, out + off, p.hw, p.scale[ch], p.shift[ch], rs, rt, k);
    }
  }
}

template <int R, typename T, typename S>
void rows_act(const T* y, const T* r, T* out, const BnAddActParams<S>& p, int64_t begin, int64_t end) {
  if (p.relu) {
    rows<R, true>(y, r, out, p, begin, end);
  } else {
    rows<R, false>(y, r, out, p, begin, end);
  }
}

// ------------------------------------------------------------- reductions, backward

// About 32K values per reduction work item: enough work to amortise a task, and small
// enough that a batch_stats block's two passes run from cache.
constexpr int64_t kItemValues = 32768;
// independent accumulators of a contiguous run (lets the compiler vectorise the sums; the
// lanes are added in a fixed order)
constexpr int kLanes = 8;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// slot: doubles per channel per block in the workspace (3 for batch_stats, 2 for the reduce)
CpuReduceGeom reduce_geom(int64_t n, int64_t c, int64_t hw, Layout layout, int64_t tiles, int64_t slot) {
  CpuReduceGeom g;
  const int64_t m = n * hw;
  // NHWC blocks hold whole pixels; at least 64 of them, so that wide layers (C in the
  // thousands) do not need a workspace slot for every few rows
  g.rows = layout == Layout::NHWC ? std::max<int64_t>(64, kItemValues / std::max<int64_t>(c, 1)) : kItemValues;
  g.per_tile = std::max<int64_t>(1, cdiv(cdiv(m, tiles), g.rows));
  const int64_t blocks = tiles * g.per_tile;
  g.items = layout == Layout::NHWC ? blocks : blocks * c;
  g.work = blocks * slot * c;
  return g;
}

// Rows [r0, r1) of block `blk` (tile blk / per_tile).
inline void block_rows(int64_t m, int64_t tiles, const CpuReduceGeom& g, int64_t blk, int64_t& r0, int64_t& r1) {
  const int64_t t = blk / g.per_tile, j = blk % g.per_tile;
  const int64_t tb = stats_tile_begin(m, tiles, t), te = stats_tile_begin(m, tiles, t + 1);
  r0 = std::min(te, tb + j * g.rows);
  r1 = std::min(te, r0 + g.rows);
}

// Calls f(n, offset, len) for the contiguous runs of channel ch's values over the pixels
// [r0, r1) of an NCHW tensor (one run per sample the range touches).
template <typename F>
inline void nchw_runs(int64_t r0, int64_t r1, int64_t ch, int64_t C, int64_t hw, F&& f) {
  for (int64_t m = r0; m < r1;) {
    const int64_t n = m / hw, i = m - n * hw;
    const int64_t len = std::min(hw - i, r1 - m);
    f(n, (n * C + ch) * hw + i, len);
    m += len;
  }
}

inline double fold(const double* acc) {
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <typename T>
inline void lane_sum(const T* __restrict v, int64_t len, double* __restrict acc) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += ld<double>(v[i + j]);
  for (int j = 0; i + j < len; ++j) acc[j] += ld<double>(v[i + j]);
}

template <typename T>
inline void lane_sq_dev(const T* __restrict v, int64_t len, double mean, double* __restrict acc) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double d = ld<double>(v[i + j]) - mean;
      acc[j] += d * d;
    }
  for (int j = 0; i + j < len; ++j) {
    const double d = ld<double>(v[i + j]) - mean;
    acc[j] += d * d;
  }
}

// g of one element (bn_kernels.h), in S and in the reference's order of operations.
template <bool Relu, bool HasOut, bool Sample, typename T, typename S>
inline S grad_of(T d, T yv, T ov, S scale, S shift, S k) {
  S g = ld<S>(d);
  if constexpr (Relu) {
    S z;
    if constexpr (HasOut) {
      z = ld<S>(ov);
    } else {
      z = ld<S>(yv) * scale + shift;
    }
    g = z <= S(0) ? S(0) : g;  // NaN z keeps g (threshold_backward)
  }
  if constexpr (Sample) g = g * k;
  return g;
}

// Runs f(Relu, HasOut, Sample) with the flags as std::bool_constant.
template <typename F>
inline void with_grad_flags(bool relu, bool has_out, bool sample, F&& f) {
  using N = std::false_type;
  using Y = std::true_type;
  if (!relu) {
    if (sample) f(N{}, N{}, Y{}); else f(N{}, N{}, N{});
  } else if (!has_out) {
    if (sample) f(Y{}, N{}, Y{}); else f(Y{}, N{}, N{});
  } else {
    if (sample) f(Y{}, Y{}, Y{}); else f(Y{}, Y{}, N{});
  }
}

}  // namespace

template <typename T, typename S>
void bn_add_act_cpu(const T* y, const T* residual, T* out, const BnAddActParams<S>& p, int64_t row_begin,
                    int64_t row_end) {
  if (residual == nullptr) {
    rows_act<kNone>(y, residual, out, p, row_begin, row_end);
  } else if (p.res_scale == nullptr) {
    rows_act<kPlain>(y, residual, out, p, row_begin, row_end);
  } else {
    rows_act<kDual>(y, residual, out, p, row_begin, row_end);
  }
}

template <typename S>
void bn_finalize_cpu(const BnFinalizeParams<S>& p, int64_t c_begin, int64_t c_end) {
  for (int64_t c = c_begin; c < c_end; ++c) finalize_channel(p, c);
}

template <typename S>
double partials_min_count_cpu(const S* partials, int64_t tiles, int64_t c) {
  double least = 0.0;
  for (int64_t ch = 0; ch < c; ++ch) {
    double n = 0.0;
    for (int64_t t = 0; t < tiles; ++t) {
      const double v = partials[t * 3 * c + ch];
      if (v > 0.0) n += v;
    }
    if (ch == 0 || n < least) least = n;
  }
  return least;
}

#define FUSEDRES_BN_ADD_ACT_CPU(T, S) \
  template void bn_add_act_cpu<T, S>(const T*, const T*, T*, const BnAddActParams<S>&, int64_t, int64_t);
FUSEDRES_BN_ADD_ACT_CPU(float, float)
FUSEDRES_BN_ADD_ACT_CPU(double, double)
FUSEDRES_BN_ADD_ACT_CPU(Half, float)
FUSEDRES_BN_ADD_ACT_CPU(BFloat16, float)
#undef FUSEDRES_BN_ADD_ACT_CPU

template void bn_finalize_cpu<float>(const BnFinalizeParams<float>&, int64_t, int64_t);
template void bn_finalize_cpu<double>(const BnFinalizeParams<double>&, int64_t, int64_t);
template double partials_min_count_cpu<float>(const float*, int64_t, int64_t);
template double partials_min_count_cpu<double>(const double*, int64_t, int64_t);

// ------------------------------------------------------------------------ batch_stats

CpuReduceGeom batch_stats_geom_cpu(int64_t n, int64_t c, int64_t hw, Layout layout, int64_t tiles) {
  return reduce_geom(n, c, hw, layout, tiles, 3);
}

template <typename T, typename S>
void batch_stats_blocks_cpu(const T* x, const BatchStatsParams<S>& p, double* work, int64_t item_begin,
                            int64_t item_end) {
  const int64_t C = p.c, m = p.n * p.hw;
  const CpuReduceGeom g = batch_stats_geom_cpu(p.n, p.c, p.hw, p.layout, p.tiles);
  for (int64_t item = item_begin; item < item_end; ++item) {
    if (p.layout == Layout::NHWC) {
      // one block of rows, every channel: two passes over the rows, per-channel sums in double
      const int64_t blk = item;
      int64_t r0, r1;
      block_rows(m, p.tiles, g, blk, r0, r1);
      double* __restrict cnt = work + blk * 3 * C;
      double* __restrict mean = cnt + C;
      double* __restrict m2 = cnt + 2 * C;
      const double k = double(r1 - r0);
      for (int64_t ch = 0; ch < C; ++ch) {
        cnt[ch] = k;
        mean[ch] = 0.0;
        m2[ch] = 0.0;
      }
      for (int64_t r = r0; r < r1; ++r) {
        const T* __restrict row = x + r * C;
        for (int64_t ch = 0; ch < C; ++ch) mean[ch] += ld<double>(row[ch]);
      }
      for (int64_t ch = 0; ch < C; ++ch) mean[ch] = k > 0 ? mean[ch] / k : 0.0;
      for (int64_t r = r0; r < r1; ++r) {
        const T* __restrict row = x + r * C;
        for (int64_t ch = 0; ch < C; ++ch) {
          const double d = ld<double>(row[ch]) - mean[ch];
          m2[ch] += d * d;
        }
      }
    } else {
      // one block of rows of one channel: its contiguous runs, lane sums in double
      const int64_t blk = item / C, ch = item % C;
      int64_t r0, r1;
      block_rows(m, p.tiles, g, blk, r0, r1);
      double acc[kLanes] = {};
      nchw_runs(r0, r1, ch, C, p.hw, [&](int64_t, int64_t off, int64_t len) { lane_sum(x + off, len, acc); });
      const double k = double(r1 - r0);
      const double mean = k > 0 ? fold(acc) / k : 0.0;
      double sq[kLanes] = {};
      nchw_runs(r0, r1, ch, C, p.hw, [&](int64_t, int64_t off, int64_t len) { lane_sq_dev(x + off, len, mean, sq); });
      double* slot = work + blk * 3 * C;
      slot[ch] = k;
      slot[C + ch] = mean;
      slot[2 * C + ch] = fold(sq);
    }
  }
}

template <typename S>
void batch_stats_merge_cpu(const BatchStatsParams<S>& p, const double* work, int64_t c_begin, int64_t c_end) {
  const int64_t C = p.c;
  const CpuReduceGeom g = batch_stats_geom_cpu(p.n, p.c, p.hw, p.layout, p.tiles);
  for (int64_t ch = c_begin; ch < c_end; ++ch)
    for (int64_t t = 0; t < p.tiles; ++t) {
      double n = 0.0, mean = 0.0, m2 = 0.0;
      for (int64_t j = 0; j < g.per_tile; ++j) {
        const double* slot = work + (t * g.per_tile + j) * 3 * C;
        const double nb = slot[ch], mb = slot[C + ch], m2b = slot[2 * C + ch];
        if (nb <= 0.0) continue;
        if (n == 0.0) {
          n = nb;
          mean = mb;
          m2 = m2b;
          continue;
        }
        // Chan et al.; the mean as a weighted sum, like chan_merge.h (keeps +-Inf as a sum does)
        const double tot = n + nb, delta = mb - mean;
        m2 += m2b + delta * delta * n * nb / tot;
        mean = (n * mean + nb * mb) / tot;
        n = tot;
      }
      S* out = p.partials + t * 3 * C;
      out[ch] = static_cast<S>(n);
      out[C + ch] = n > 0.0 ? static_cast<S>(mean) : std::numeric_limits<S>::quiet_NaN();
      out[2 * C + ch] = static_cast<S>(m2);
    }
}

// ------------------------------------------------------------------ bn_backward_reduce

CpuReduceGeom bn_backward_reduce_geom_cpu(int64_t n, int64_t c, int64_t hw, Layout layout) {
  return reduce_geom(n, c, hw, layout, 1, 2);
}

template <typename T, typename S>
void bn_backward_reduce_blocks_cpu(const T* dout, const T* y, const T* out, const BnBackwardParams<S>& p,
                                   double* work, int64_t item_begin, int64_t item_end) {
  const int64_t C = p.c, m = p.n * p.hw;
  const CpuReduceGeom g = bn_backward_reduce_geom_cpu(p.n, p.c, p.hw, p.layout);
  const T* o = out != nullptr ? out : y;  // read only when the mask comes from `out`
  with_grad_flags(p.relu, out != nullptr, p.sample_scale != nullptr, [&](auto relu, auto has_out, auto sample) {
    constexpr bool R = decltype(relu)::value, H = decltype(has_out)::value, K = decltype(sample)::value;
    for (int64_t item = item_begin; item < item_end; ++item) {
      if (p.layout == Layout::NHWC) {
        const int64_t blk = item;
        int64_t r0, r1;
        block_rows(m, 1, g, blk, r0, r1);
        double* __restrict sg = work + blk * 2 * C;
        double* __restrict sgx = sg + C;
        for (int64_t ch = 0; ch < C; ++ch) sg[ch] = sgx[ch] = 0.0;
        for (int64_t r = r0; r < r1; ++r) {
          const S k = K ? p.sample_scale[r / p.hw] : S(1);
          const T* __restrict d = dout + r * C;
          const T* __restrict yr = y + r * C;
          const T* __restrict orow = o + r * C;
          for (int64_t ch = 0; ch < C; ++ch) {
            const S gv = grad_of<R, H, K>(d[ch], yr[ch], orow[ch], p.scale[ch], p.shift[ch], k);
            const S xh = (ld<S>(yr[ch]) - p.mean[ch]) * p.invstd[ch];
            sg[ch] += double(gv);
            sgx[ch] += double(gv * xh);
          }
        }
      } else {
        const int64_t blk = item / C, ch = item % C;
        int64_t r0, r1;
        block_rows(m, 1, g, blk, r0, r1);
        const S scale = p.scale[ch], shift = p.shift[ch], mean = p.mean[ch], inv = p.invstd[ch];
        double ag[kLanes] = {}, agx[kLanes] = {};
        nchw_runs(r0, r1, ch, C, p.hw, [&](int64_t n, int64_t off, int64_t len) {
          const S k = K ? p.sample_scale[n] : S(1);
          const T* __restrict d = dout + off;
          const T* __restrict yr = y + off;
          const T* __restrict orow = o + off;
          const auto term = [&](int64_t i, int j) {
            const S gv = grad_of<R, H, K>(d[i], yr[i], orow[i], scale, shift, k);
            ag[j] += double(gv);
            agx[j] += double(gv * ((ld<S>(yr[i]) - mean) * inv));
          };
          int64_t i = 0;
          for (; i + kLanes <= len; i += kLanes)
            for (int j = 0; j < kLanes; ++j) term(i + j, j);
          for (int j = 0; i + j < len; ++j) term(i + j, j);
        });
        double* slot = work + blk * 2 * C;
        slot[ch] = fold(ag);
        slot[C + ch] = fold(agx);
      }
    }
  });
}

template <typename S>
void bn_backward_reduce_merge_cpu(const BnBackwardParams<S>& p, const double* work, int64_t c_begin,
                                  int64_t c_end) {
  const int64_t C = p.c;
  const CpuReduceGeom g = bn_backward_reduce_geom_cpu(p.n, p.c, p.hw, p.layout);
  for (int64_t ch = c_begin; ch < c_end; ++ch) {
    double a = 0.0, b = 0.0;
    for (int64_t blk = 0; blk < g.per_tile; ++blk) {
      a += work[blk * 2 * C + ch];
      b += work[blk * 2 * C + C + ch];
    }
    p.sum_g[ch] = static_cast<S>(a);
    p.sum_gx[ch] = static_cast<S>(b);
  }
}

// ---------------------------------------------------------------- bn_backward_apply

template <typename S>
void bn_backward_coefs_cpu(const BnBackwardParams<S>& p, const S* sum_g, const S* sum_gx, S* coefs) {
  const int64_t C = p.c;
  const S m = static_cast<S>(p.n * p.hw);
  for (int64_t ch = 0; ch < C; ++ch)
    bn_backward_coefs_channel<S>(p.scale[ch], p.invstd[ch], p.mean[ch], sum_g[ch], sum_gx[ch], m, coefs + ch,
                                 coefs + C + ch, coefs + 2 * C + ch);
}

template <typename T, typename S>
void bn_backward_apply_cpu(const T* dout, const T* y, const T* out, const T* addend, T* grad_out, T* dy,
                           const BnBackwardParams<S>& p, int64_t row_begin, int64_t row_end) {
  const int64_t C = p.c;
  const S* A = p.coefs;
  const S* B = p.coefs + C;
  const S* Cc = p.coefs + 2 * C;
  const T* o = out != nullptr ? out : y;
  const T* ad = addend != nullptr ? addend : y;  // read only when addend is given
  with_grad_flags(p.relu, out != nullptr, p.sample_scale != nullptr, [&](auto relu, auto has_out, auto sample) {
    constexpr bool R = decltype(relu)::value, H = decltype(has_out)::value, K = decltype(sample)::value;
    auto rows = [&](auto has_add, auto has_gout) {
      constexpr bool D = decltype(has_add)::value, G = decltype(has_gout)::value;
      if (p.layout == Layout::NHWC) {
        for (int64_t row = row_begin; row < row_end; ++row) {
          const int64_t off = row * C;
          const S k = K ? p.sample_scale[row / p.hw] : S(1);
          const T* __restrict d = dout + off;
          const T* __restrict yr = y + off;
          const T* __restrict orow = o + off;
          const T* __restrict arow = ad + off;
          T* __restrict res = dy + off;
          for (int64_t ch = 0; ch < C; ++ch) {
            // the masked gradient before the sample's scale (grad_of's last step)
            S gv = grad_of<R, H, false>(d[ch], yr[ch], orow[ch], p.scale[ch], p.shift[ch], k);
            if constexpr (G) st(grad_out[off + ch], gv);
            if constexpr (K) gv = gv * k;
            const S v = gv * A[ch] + ld<S>(yr[ch]) * B[ch] + Cc[ch];
            st(res[ch], D ? v + ld<S>(arow[ch]) : v);
          }
        }
      } else {
        for (int64_t row = row_begin; row < row_end; ++row) {
          const int64_t off = row * p.hw, ch = row % C;
          const S k = K ? p.sample_scale[row / C] : S(1);
          const S scale = p.scale[ch], shift = p.shift[ch], a = A[ch], b = B[ch], c = Cc[ch];
          const T* __restrict d = dout + off;
          const T* __restrict yr = y + off;
          const T* __restrict orow = o + off;
          const T* __restrict arow = ad + off;
          T* __restrict res = dy + off;
          for (int64_t i = 0; i < p.hw; ++i) {
            S gv = grad_of<R, H, false>(d[i], yr[i], orow[i], scale, shift, k);
            if constexpr (G) st(grad_out[off + i], gv);
            if constexpr (K) gv = gv * k;
            const S v = gv * a + ld<S>(yr[i]) * b + c;
            st(res[i], D ? v + ld<S>(arow[i]) : v);
          }
        }
      }
    };
    using N = std::false_type;
    using Y = std::true_type;
    if (grad_out != nullptr) {
      if (addend != nullptr) rows(Y{}, Y{}); else rows(N{}, Y{});
    } else {
      if (addend != nullptr) rows(Y{}, N{}); else rows(N{}, N{});
    }
  });
}

// ------------------------------------------------------------------------- act_grad

template <typename T>
void act_grad_cpu(const T* dout, const T* out, T* dx, int64_t begin, int64_t end) {
  using Cmp = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const T zero{};  // +0 for every storage type
  for (int64_t i = begin; i < end; ++i) {
    const T d = dout[i];  // read unconditionally: the select then vectorises
    dx[i] = ld<Cmp>(out[i]) <= Cmp(0) ? zero : d;
  }
}

// ------------------------------------------------------------------------- relu

namespace {

// A 16-bit pattern is negative, non-zero and not NaN when its sign bit is set and its
// magnitude bits lie in (0, inf_bits]: exactly the values ReLU maps to +0.
template <uint16_t InfBits>
inline void relu_bits(uint16_t* x, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const uint16_t b = x[i];
    const uint16_t mag = b & 0x7fffu;
    const bool to_zero = (b & 0x8000u) != 0 && mag != 0 && mag <= InfBits;
    x[i] = to_zero ? uint16_t(0) : b;
  }
}

}  // namespace

template <typename T>
void relu_inplace_cpu(T* x, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    relu_bits<0x7f80u>(reinterpret_cast<uint16_t*>(x), begin, end);
  } else if constexpr (std::is_same_v<T, Half>) {
    relu_bits<0x7c00u>(reinterpret_cast<uint16_t*>(x), begin, end);
  } else {
    for (int64_t i = begin; i < end; ++i) {
      const T v = x[i];
      x[i] = v < T(0) ? T(0) : v;
    }
  }
}

#define FUSEDRES_BN_REDUCE_CPU(T, S)                                                                       \
  template void batch_stats_blocks_cpu<T, S>(const T*, const BatchStatsParams<S>&, double*, int64_t, int64_t); \
  template void bn_backward_reduce_blocks_cpu<T, S>(const T*, const T*, const T*, const BnBackwardParams<S>&,  \
                                                    double*, int64_t, int64_t);                              \
  template void bn_backward_apply_cpu<T, S>(const T*, const T*, const T*, const T*, T*, T*,                 \
                                            const BnBackwardParams<S>&, int64_t, int64_t);                   \
  template void act_grad_cpu<T>(const T*, const T*, T*, int64_t, int64_t);                                 \
  template void relu_inplace_cpu<T>(T*, int64_t, int64_t);
FUSEDRES_BN_REDUCE_CPU(float, float)
FUSEDRES_BN_REDUCE_CPU(double, double)
FUSEDRES_BN_REDUCE_CPU(Half, float)
FUSEDRES_BN_REDUCE_CPU(BFloat16, float)
#undef FUSEDRES_BN_REDUCE_CPU

template void batch_stats_merge_cpu<float>(const BatchStatsParams<float>&, const double*, int64_t, int64_t);
template void batch_stats_merge_cpu<double>(const BatchStatsParams<double>&, const double*, int64_t, int64_t);
template void bn_backward_reduce_merge_cpu<float>(const BnBackwardParams<float>&, const double*, int64_t, int64_t);
template void bn_backward_reduce_merge_cpu<double>(const BnBackwardParams<double>&, const double*, int64_t,
                                                   int64_t);
template void bn_backward_coefs_cpu<float>(const BnBackwardParams<float>&, const float*, const float*, float*);
template void bn_backward_coefs_cpu<double>(const BnBackwardParams<double>&, const double*, const double*, double*);

}  // namespace fusedres
