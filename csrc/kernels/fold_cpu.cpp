#include "fold_cpu.h"

#include <type_traits>

#include "isa_clones.h"  // the conversions to and from 16-bit types need AVX-512 or AVX2 to vectorise

namespace fusedres {
namespace {

template <typename T>
FUSEDRES_INLINE float load_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return to_float(v);
  }
}

template <typename T>
FUSEDRES_INLINE T store_as(float f) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    return bfloat16_from_float(f);
  } else {
    return half_from_float(f);
  }
}

template <typename In, typename Out>
FUSEDRES_INLINE void fold_rows(const In* __restrict w, const float* __restrict scale, Out* __restrict out,
                               int64_t block, int64_t k_begin, int64_t k_end) {
  for (int64_t k = k_begin; k < k_end; ++k) {
    const float s = scale[k];
    const In* __restrict src = w + k * block;
    Out* __restrict dst = out + k * block;
    for (int64_t i = 0; i < block; ++i) dst[i] = store_as<Out>(load_float(src[i]) * s);
  }
}

#define FUSEDRES_FOLD_CLONE(NAME, IN, OUT)                                                                     \
  FUSEDRES_ISA_CLONES void NAME(const IN* w, const float* scale, OUT* out, int64_t block, int64_t b, int64_t e) { \
    fold_rows(w, scale, out, block, b, e);                                                                    \
  }
FUSEDRES_FOLD_CLONE(fold_f32_f32, float, float)
FUSEDRES_FOLD_CLONE(fold_f32_bf16, float, BFloat16)
FUSEDRES_FOLD_CLONE(fold_f32_f16, float, Half)
FUSEDRES_FOLD_CLONE(fold_bf16_f32, BFloat16, float)
FUSEDRES_FOLD_CLONE(fold_bf16_bf16, BFloat16, BFloat16)
FUSEDRES_FOLD_CLONE(fold_bf16_f16, BFloat16, Half)
FUSEDRES_FOLD_CLONE(fold_f16_f32, Half, float)
FUSEDRES_FOLD_CLONE(fold_f16_bf16, Half, BFloat16)
FUSEDRES_FOLD_CLONE(fold_f16_f16, Half, Half)
#undef FUSEDRES_FOLD_CLONE

}  // namespace

template <typename In, typename Out>
void fold_scale_cpu(const In* w, const float* scale, Out* out, int64_t block, int64_t k_begin, int64_t k_end) {
#define FUSEDRES_FOLD_CASE(IN, OUT, NAME) \
  if constexpr (std::is_same_v<In, IN> && std::is_same_v<Out, OUT>) NAME(w, scale, out, block, k_begin, k_end);
  FUSEDRES_FOLD_CASE(float, float, fold_f32_f32)
  FUSEDRES_FOLD_CASE(float, BFloat16, fold_f32_bf16)
  FUSEDRES_FOLD_CASE(float, Half, fold_f32_f16)
  FUSEDRES_FOLD_CASE(BFloat16, float, fold_bf16_f32)
  FUSEDRES_FOLD_CASE(BFloat16, BFloat16, fold_bf16_bf16)
  FUSEDRES_FOLD_CASE(BFloat16, Half, fold_bf16_f16)
  FUSEDRES_FOLD_CASE(Half, float, fold_f16_f32)
  FUSEDRES_FOLD_CASE(Half, BFloat16, fold_f16_bf16)
  FUSEDRES_FOLD_CASE(Half, Half, fold_f16_f16)
#undef FUSEDRES_FOLD_CASE
}

#define FUSEDRES_FOLD_INST(IN, OUT) \
  template void fold_scale_cpu<IN, OUT>(const IN*, const float*, OUT*, int64_t, int64_t, int64_t);
FUSEDRES_FOLD_INST(float, float)
FUSEDRES_FOLD_INST(float, BFloat16)
FUSEDRES_FOLD_INST(float, Half)
FUSEDRES_FOLD_INST(BFloat16, float)
FUSEDRES_FOLD_INST(BFloat16, BFloat16)
FUSEDRES_FOLD_INST(BFloat16, Half)
FUSEDRES_FOLD_INST(Half, float)
FUSEDRES_FOLD_INST(Half, BFloat16)
FUSEDRES_FOLD_INST(Half, Half)
#undef FUSEDRES_FOLD_INST

}  // namespace fusedres
