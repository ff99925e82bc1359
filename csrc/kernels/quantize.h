// uint8 min-max quantization of float32 chunks for quantized all-reduce.
//
// A quantized chunk is [min: f32][max: f32][one code per element], codes
// = round((x - min) / scale) with scale = (max - min) / 255, decoded as
// min + code * scale. A constant chunk (max == min) decodes exactly. The
// arithmetic is plain IEEE float32 with no fused multiply-add (the kernels
// are built with -ffp-contract=off), so every machine decodes the same
// bytes to the same bits.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pyccl {

inline constexpr size_t kQuantHeaderBytes = 8;
inline size_t quantized_bytes(size_t count) { return kQuantHeaderBytes + count; }

// Returns false (writing nothing useful) if x holds NaN or an infinity.
bool quantize_u8(const float* x, size_t count, uint8_t* out);
void dequantize_u8(const uint8_t* in, size_t count, float* out);

}  // namespace pyccl
