// Branch-free float16 / bfloat16 <-> float32 conversions.
//
// Written with integer ops only so that (a) GCC/Clang vectorize the loops in
// reduce.cpp without needing F16C or AVX512-FP16, and (b) the same bit-exact
// results can be produced by a CUDA kernel later. Rounding is IEEE
// round-to-nearest-even; NaNs stay NaNs (quiet), infinities stay infinities.
#pragma once

#include <cstdint>
#include <cstring>

namespace pyccl::half {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t is_nan = ((u & 0x7fffffffu) > 0x7f800000u);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>(is_nan ? quiet_nan : rounded);
}

// float16 <-> float32 following the well-known branch-free formulation
// (M. Dukhan's FP16 library): exponent rebiasing with float multiplies, so
// rounding is done by the FPU in round-to-nearest-even. Exact for normals,
// subnormals, zeros, infinities and NaNs (NaN payloads are quieted).
inline float fp16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float normalized = bits_to_float((two_w >> 4) + exp_offset) * bits_to_float(0x07800000u);  // 2^-112
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t denorm_cutoff = 1u << 27;
  return bits_to_float(sign | (two_w < denorm_cutoff ? float_to_bits(denormalized) : float_to_bits(normalized)));
}

inline uint16_t float_to_fp16(float f) {
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  float base = (bits_to_float(w & 0x7fffffffu) * bits_to_float(0x77800000u)) * bits_to_float(0x08800000u);  // *2^112 *2^-110
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

}  // namespace pyccl::half
