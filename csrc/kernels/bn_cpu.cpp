// CPU implementations of the kernels in bn_kernels.h. Inner loops run over contiguous
// memory with no data-dependent branches except the ReLU select, so the compiler can
// vectorise them at -O3.
#include "bn_kernels.h"
#include "chan_merge.h"

#include <cmath>

namespace fusedres {
namespace {

template <typename S>
inline S relu_nan(S z) {
  // torch.relu keeps NaN; std::fmax would drop it
  return (z > S(0) || z != z) ? z : S(0);
}

template <typename T, typename S>
inline void apply_row(const T* y, const T* r, T* o, int64_t len, S scale_c, S shift_c, const S* scale, const S* shift,
                      const S* rs, const S* rt, S k, bool relu, bool per_elem_channel) {
  for (int64_t i = 0; i < len; ++i) {
    const S sc = per_elem_channel ? scale[i] : scale_c;
    const S sh = per_elem_channel ? shift[i] : shift_c;
    S z = (static_cast<S>(y[i]) * sc + sh) * k;
    if (r != nullptr) {
      S rv = static_cast<S>(r[i]);
      if (rs != nullptr) rv = rv * rs[i] + rt[i];
      z += rv;
    }
    o[i] = static_cast<T>(relu ? relu_nan(z) : z);
  }
}

}  // namespace

template <typename T, typename S>
void bn_add_act_cpu(const T* y, const T* residual, T* out, const BnAddActParams<S>& p, int64_t row_begin,
                    int64_t row_end) {
  if (p.layout == Layout::NHWC) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t off = row * p.c;
      const S k = p.sample_scale ? p.sample_scale[row / p.hw] : S(1);
      apply_row<T, S>(y + off, residual ? residual + off : nullptr, out + off, p.c, S(0), S(0), p.scale, p.shift,
                      p.res_scale, p.res_shift, k, p.relu, true);
    }
  } else {
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t off = row * p.hw;
      const int64_t ch = row % p.c;
      const S k = p.sample_scale ? p.sample_scale[row / p.c] : S(1);
      if (p.res_scale != nullptr) {
        // dual BN with a per-plane constant residual affine: fold into scalars
        const S rs = p.res_scale[ch], rt = p.res_shift[ch];
        for (int64_t i = 0; i < p.hw; ++i) {
          S z = (static_cast<S>(y[off + i]) * p.scale[ch] + p.shift[ch]) * k + static_cast<S>(residual[off + i]) * rs + rt;
          out[off + i] = static_cast<T>(p.relu ? relu_nan(z) : z);
        }
      } else {
        apply_row<T, S>(y + off, residual ? residual + off : nullptr, out + off, p.hw, p.scale[ch], p.shift[ch],
                        nullptr, nullptr, nullptr, nullptr, k, p.relu, false);
      }
    }
  }
}

template <typename S>
void bn_finalize_cpu(const BnFinalizeParams<S>& p, int64_t c_begin, int64_t c_end) {
  for (int64_t c = c_begin; c < c_end; ++c) finalize_channel(p, c);
}

template <typename S>
double partials_count_cpu(const S* partials, int64_t tiles, int64_t c) {
  double n = 0.0;
  for (int64_t t = 0; t < tiles; ++t) n += partials[t * 3 * c];
  return n;
}

template void bn_add_act_cpu<float, float>(const float*, const float*, float*, const BnAddActParams<float>&, int64_t,
                                           int64_t);
template void bn_add_act_cpu<double, double>(const double*, const double*, double*, const BnAddActParams<double>&,
                                             int64_t, int64_t);
template void bn_finalize_cpu<float>(const BnFinalizeParams<float>&, int64_t, int64_t);
template void bn_finalize_cpu<double>(const BnFinalizeParams<double>&, int64_t, int64_t);
template double partials_count_cpu<float>(const float*, int64_t, int64_t);
template double partials_count_cpu<double>(const double*, int64_t, int64_t);

}  // namespace fusedres
