#include "kernels/quantize.h"

#include <cmath>
#include <cstring>

namespace pyccl {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYCCL_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define PYCCL_MULTIVERSION
#endif

PYCCL_MULTIVERSION
bool quantize_u8(const float* __restrict x, size_t count, uint8_t* __restrict out) {
  float mn = count ? x[0] : 0.0f, mx = mn;
  // v * 0 is NaN exactly for NaN and +-Inf: one branch-free, vectorizable
  // pass finds the range and whether every value is finite.
  float poison = 0.0f;
  for (size_t i = 0; i < count; ++i) {
    const float v = x[i];
    poison += v * 0.0f;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  if (poison != 0.0f) return false;
  std::memcpy(out, &mn, 4);
  std::memcpy(out + 4, &mx, 4);
  uint8_t* codes = out + kQuantHeaderBytes;
  const float range = mx - mn;
  if (!(range > 0.0f) || !std::isfinite(range)) {  // constant chunk (or a range beyond float32)
    if (!std::isfinite(range)) return false;
    std::memset(codes, 0, count);
    return true;
  }
  const float inv = 255.0f / range;
  for (size_t i = 0; i < count; ++i) {
    float q = (x[i] - mn) * inv + 0.5f;  // round half up; q in [0.5, 255.5]
    q = q < 255.0f ? q : 255.0f;
    codes[i] = static_cast<uint8_t>(static_cast<int32_t>(q));
  }
  return true;
}

PYCCL_MULTIVERSION
void dequantize_u8(const uint8_t* __restrict in, size_t count, float* __restrict out) {
  float mn, mx;
  std::memcpy(&mn, in, 4);
  std::memcpy(&mx, in + 4, 4);
  const float scale = (mx - mn) / 255.0f;
  const uint8_t* codes = in + kQuantHeaderBytes;
  for (size_t i = 0; i < count; ++i) out[i] = mn + static_cast<float>(codes[i]) * scale;
}

}  // namespace pyccl
