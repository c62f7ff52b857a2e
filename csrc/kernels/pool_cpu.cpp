#include "pool_cpu.h"

#include <limits>
#include <type_traits>

#include "isa_clones.h"  // the pooling loops are compiled for AVX-512, AVX2 and the baseline

namespace fusedres {
namespace {

// One output pixel's channels [0, nc) (pix: channels per input pixel, the tap stride): the
// maximum over the window's nr x ns valid taps, x at the first of them. PyTorch's rule: a
// larger value or a NaN replaces the maximum so far. The channels go in chunks of CH held in
// registers over all the taps (a tail of fewer after them), so each input element costs a
// load and a few selects and each output one store.
//
// With relu, only the first tap goes through it: max(relu(x0), x1, ...) is
// max(relu(x0), relu(x1), ...) bit for bit. A later x < 0 never replaces the maximum (which
// is then at least a zero), nor would the +0 relu makes of it (+0 > -0 is false); every other
// x is its own relu, and NaN wins either way.

// float, double: the maximum is the element itself (its bits, a NaN's payload included)
template <bool RELU, int CH, typename F>
FUSEDRES_INLINE void pool_channels(const F* __restrict x, F* __restrict dst, int64_t nc, int64_t pix, int64_t row_stride,
                                   int64_t nr, int64_t ns) {
  F acc[CH];
  for (int64_t c = 0; c < nc; ++c) {
    const F f = x[c];
    acc[c] = RELU && f < F(0) ? F(0) : f;  // torch.relu: -0 and NaN stay
  }
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t s = r == 0 ? 1 : 0; s < ns; ++s) {
      const F* __restrict src = x + r * row_stride + s * pix;
      for (int64_t c = 0; c < nc; ++c) {
        const F f = src[c];
        const F d = acc[c];
        const F larger = f > d ? f : d;  // (two selects, not one on an or: that form vectorises)
        acc[c] = f != f ? f : larger;
      }
    }
  }
  for (int64_t c = 0; c < nc; ++c) dst[c] = acc[c];
}

// 16-bit storage: compared as float (exact), the winning bit pattern copied
template <bool RELU, int CH, typename Decode>
FUSEDRES_INLINE void pool_channels_16(const uint16_t* __restrict x, uint16_t* __restrict dst, int64_t nc, int64_t pix,
                                      int64_t row_stride, int64_t nr, int64_t ns, Decode decode) {
  float best[CH];
  uint16_t bits[CH];
  for (int64_t c = 0; c < nc; ++c) {
    const uint16_t u = x[c];
    const float f = decode(u);
    const bool neg = RELU && f < 0.0f;
    bits[c] = neg ? uint16_t(0) : u;  // +0 in both 16-bit formats
    best[c] = neg ? 0.0f : f;
  }
  for (int64_t r = 0; r < nr; ++r) {
    for (int64_t s = r == 0 ? 1 : 0; s < ns; ++s) {
      const uint16_t* __restrict src = x + r * row_stride + s * pix;
      for (int64_t c = 0; c < nc; ++c) {
        const uint16_t u = src[c];
        const float f = decode(u);
        const float b = best[c];
        const uint16_t ub = bits[c];
        const bool gt = f > b, nan = f != f;
        const float larger = gt ? f : b;
        const uint16_t larger_u = gt ? u : ub;
        best[c] = nan ? f : larger;
        bits[c] = nan ? u : larger_u;
      }
    }
  }
  for (int64_t c = 0; c < nc; ++c) dst[c] = bits[c];
}

constexpr int kChunk = 32;  // channels per register-held chunk

// the pixel's channels: full chunks (a compile-time count the compiler unrolls into vector
// registers), then the tail
template <bool RELU, typename F>
FUSEDRES_INLINE void pool_pixel(const F* x, F* dst, int64_t nc, int64_t row_stride, int64_t nr, int64_t ns) {
  int64_t c0 = 0;
  for (; c0 + kChunk <= nc; c0 += kChunk) pool_channels<RELU, kChunk>(x + c0, dst + c0, kChunk, nc, row_stride, nr, ns);
  if (c0 < nc) pool_channels<RELU, kChunk>(x + c0, dst + c0, nc - c0, nc, row_stride, nr, ns);
}

template <bool RELU, typename Decode>
FUSEDRES_INLINE void pool_pixel_16(const uint16_t* x, uint16_t* dst, int64_t nc, int64_t row_stride, int64_t nr,
                                   int64_t ns, Decode decode) {
  int64_t c0 = 0;
  for (; c0 + kChunk <= nc; c0 += kChunk) {
    pool_channels_16<RELU, kChunk>(x + c0, dst + c0, kChunk, nc, row_stride, nr, ns, decode);
  }
  if (c0 < nc) pool_channels_16<RELU, kChunk>(x + c0, dst + c0, nc - c0, nc, row_stride, nr, ns, decode);
}

inline float decode_bf16(uint16_t u) { return detail::bits_float(static_cast<uint32_t>(u) << 16); }
inline float decode_half(uint16_t u) { return to_float(Half{u}); }

template <bool RELU, typename T>
FUSEDRES_INLINE void pool_pixel_any(const T* x, T* dst, int64_t nc, int64_t row_stride, int64_t nr, int64_t ns) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    pool_pixel_16<RELU>(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<uint16_t*>(dst), nc, row_stride, nr,
                        ns, decode_bf16);
  } else if constexpr (std::is_same_v<T, Half>) {
    pool_pixel_16<RELU>(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<uint16_t*>(dst), nc, row_stride, nr,
                        ns, decode_half);
  } else {
    pool_pixel<RELU>(x, dst, nc, row_stride, nr, ns);
  }
}

template <typename T>
FUSEDRES_INLINE void max_pool_rows(const T* x, T* y, const MaxPoolParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t nc = p.c, h = p.h, w = p.w, np = p.p, nq = p.q;
  const int64_t kh = p.kh, kw = p.kw, sh = p.sh, sw = p.sw, ph = p.ph, pw = p.pw;
  const int64_t row_stride = w * nc;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / np, op = row % np;
    const int64_t ih0 = op * sh - ph;
    const int64_t r0 = ih0 < 0 ? -ih0 : 0, r1 = ih0 + kh > h ? h - ih0 : kh;
    for (int64_t oq = 0; oq < nq; ++oq) {
      const int64_t iw0 = oq * sw - pw;
      const int64_t s0 = iw0 < 0 ? -iw0 : 0, s1 = iw0 + kw > w ? w - iw0 : kw;
      T* dst = y + ((n * np + op) * nq + oq) * nc;
      // the window's first valid tap (padding <= kernel/2 leaves every window one)
      const T* first = x + ((n * h + ih0 + r0) * w + iw0 + s0) * nc;
      if (p.relu) {
        pool_pixel_any<true>(first, dst, nc, row_stride, r1 - r0, s1 - s0);
      } else {
        pool_pixel_any<false>(first, dst, nc, row_stride, r1 - r0, s1 - s0);
      }
    }
  }
}

FUSEDRES_ISA_CLONES void max_pool_f32(const float* x, float* y, const MaxPoolParams& p, int64_t b, int64_t e) {
  max_pool_rows(x, y, p, b, e);
}
FUSEDRES_ISA_CLONES void max_pool_f64(const double* x, double* y, const MaxPoolParams& p, int64_t b, int64_t e) {
  max_pool_rows(x, y, p, b, e);
}
FUSEDRES_ISA_CLONES void max_pool_f16(const Half* x, Half* y, const MaxPoolParams& p, int64_t b, int64_t e) {
  max_pool_rows(x, y, p, b, e);
}
FUSEDRES_ISA_CLONES void max_pool_bf16(const BFloat16* x, BFloat16* y, const MaxPoolParams& p, int64_t b,
                                       int64_t e) {
  max_pool_rows(x, y, p, b, e);
}

}  // namespace

template <typename T>
void max_pool_nhwc_cpu(const T* x, T* y, const MaxPoolParams& p, int64_t row_begin, int64_t row_end) {
  if constexpr (std::is_same_v<T, float>) {
    max_pool_f32(x, y, p, row_begin, row_end);
  } else if constexpr (std::is_same_v<T, double>) {
    max_pool_f64(x, y, p, row_begin, row_end);
  } else if constexpr (std::is_same_v<T, Half>) {
    max_pool_f16(x, y, p, row_begin, row_end);
  } else {
    max_pool_bf16(x, y, p, row_begin, row_end);
  }
}

template void max_pool_nhwc_cpu<float>(const float*, float*, const MaxPoolParams&, int64_t, int64_t);
template void max_pool_nhwc_cpu<double>(const double*, double*, const MaxPoolParams&, int64_t, int64_t);
template void max_pool_nhwc_cpu<Half>(const Half*, Half*, const MaxPoolParams&, int64_t, int64_t);
template void max_pool_nhwc_cpu<BFloat16>(const BFloat16*, BFloat16*, const MaxPoolParams&, int64_t, int64_t);

}  // namespace fusedres
