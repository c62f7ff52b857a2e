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

// Every (input, output) type pair, listed once: X(In, Out, name suffix).
#define FUSEDRES_FOLD_TYPES(X)                                                                            \
  X(float, float, f32_f32) X(float, BFloat16, f32_bf16) X(float, Half, f32_f16) X(BFloat16, float, bf16_f32) \
  X(BFloat16, BFloat16, bf16_bf16) X(BFloat16, Half, bf16_f16) X(Half, float, f16_f32)                      \
  X(Half, BFloat16, f16_bf16) X(Half, Half, f16_f16)

// one multiversioned loop per pair
#define FUSEDRES_FOLD_CLONE(IN, OUT, SUFFIX)                                                                     \
  FUSEDRES_ISA_CLONES void fold_##SUFFIX(const IN* w, const float* scale, OUT* out, int64_t block, int64_t b, \
                                         int64_t e) {                                                          \
    fold_rows(w, scale, out, block, b, e);                                                                     \
  }
FUSEDRES_FOLD_TYPES(FUSEDRES_FOLD_CLONE)
#undef FUSEDRES_FOLD_CLONE

}  // namespace

template <typename In, typename Out>
void fold_scale_cpu(const In* w, const float* scale, Out* out, int64_t block, int64_t k_begin, int64_t k_end) {
#define FUSEDRES_FOLD_CASE(IN, OUT, SUFFIX)                            \
  if constexpr (std::is_same_v<In, IN> && std::is_same_v<Out, OUT>) { \
    fold_##SUFFIX(w, scale, out, block, k_begin, k_end);               \
  }
  FUSEDRES_FOLD_TYPES(FUSEDRES_FOLD_CASE)
#undef FUSEDRES_FOLD_CASE
}

#define FUSEDRES_FOLD_INST(IN, OUT, SUFFIX) \
  template void fold_scale_cpu<IN, OUT>(const IN*, const float*, OUT*, int64_t, int64_t, int64_t);
FUSEDRES_FOLD_TYPES(FUSEDRES_FOLD_INST)
#undef FUSEDRES_FOLD_INST
#undef FUSEDRES_FOLD_TYPES

}  // namespace fusedres
