// 16-bit floating-point storage types for the host (CPU) kernels, torch-free: IEEE binary16
// ("Half") and bfloat16 ("BFloat16"), each a 16-bit pattern with conversions to and from
// float. float -> 16-bit rounds to nearest even, overflows to infinity and keeps NaN a
// (quiet) NaN, matching the conversions of PyTorch's c10::Half and c10::BFloat16 bit for
// bit. The layouts are those of c10::Half / c10::BFloat16,
// __half / __nv_bfloat16, so the binding layer can pass tensor storage as these types.
#pragma once

#include <cstdint>
#include <cstring>

namespace fusedres {

struct Half {
  uint16_t bits;
};

struct BFloat16 {
  uint16_t bits;
};

static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit storage types must be 2 bytes");

namespace detail {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace detail

// The conversions below are written as selects between values computed for every case
// (no early returns), so that the compiler can vectorise loops that call them.

inline float to_float(BFloat16 v) { return detail::bits_float(static_cast<uint32_t>(v.bits) << 16); }

inline BFloat16 bfloat16_from_float(float f) {
  const uint32_t u = detail::float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // nearest even on the 16 dropped bits
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return BFloat16{static_cast<uint16_t>(nan ? 0x7fc0u : rounded)};
}

inline float to_float(Half v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t mag = (h & 0x7fffu) << 13;  // exponent and mantissa in float position
  const uint32_t exp = h & 0x7c00u;
  const uint32_t normal = mag + ((127u - 15u) << 23);
  const uint32_t special = mag | 0x7f800000u;  // inf / NaN
  // zero or subnormal: mantissa * 2^-24, exact in float
  const uint32_t tiny = detail::float_bits(static_cast<float>(h & 0x3ffu) * 5.9604644775390625e-8f);
  const uint32_t bits = exp == 0x7c00u ? special : (exp == 0 ? tiny : normal);
  return detail::bits_float(sign | bits);
}

inline Half half_from_float(float f) {
  const uint32_t u = detail::float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // normal half: rebias the exponent, round the 13 dropped mantissa bits to nearest even
  // (a mantissa carry correctly bumps the exponent)
  uint32_t m = a - ((127u - 15u) << 23);
  m += 0xfffu + ((m >> 13) & 1u);
  const uint32_t normal = m >> 13;
  // subnormal half or zero: adding 0.5 makes the float unit round the magnitude to a
  // multiple of 2^-24 (nearest even); the low bits are then the half's mantissa
  const uint32_t tiny = detail::float_bits(detail::bits_float(a) + 0.5f) - 0x3f000000u;
  uint32_t bits = a >= 0x38800000u ? normal : tiny;
  bits = a >= 0x477ff000u ? 0x7c00u : bits;  // >= 65520 rounds to infinity
  bits = a > 0x7f800000u ? 0x7e00u : bits;   // NaN stays a quiet NaN
  return Half{static_cast<uint16_t>(sign | bits)};
}

}  // namespace fusedres
