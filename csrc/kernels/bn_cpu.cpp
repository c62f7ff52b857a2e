// CPU implementations of the kernels in bn_cpu.h. The inner loops are specialised at
// compile time on the storage type, the residual mode and the activation, run over
// contiguous memory and have no data-dependent branches (the ReLU is a select), so the
// compiler can vectorise them at -O3 (the 16-bit conversions need -fno-trapping-math,
// which the builds pass; results do not depend on it).
#include "bn_cpu.h"

#include <cmath>
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

}  // namespace fusedres
