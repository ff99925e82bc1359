// Elementwise reduction kernels, one per (dtype, op).
//
// The ring calls reduce_step() for every chunk it receives during
// reduce-scatter: dst = op(dst, src), where dst holds the partial result that
// just arrived and src the local input. The chunk owner calls reduce_final()
// instead, which also applies AVG's division, so a half-precision value is
// rounded exactly once per step (accumulation is in float32 inside a step).
// Integer arithmetic wraps around (two's complement); integer AVG truncates
// toward zero. MIN/MAX propagate NaN.
#pragma once

#include <cstddef>

#include "kernels/dtype.h"

namespace pyccl {

void reduce_step(DType dtype, RedOp op, void* dst, const void* src, size_t count);
void reduce_final(DType dtype, RedOp op, void* dst, const void* src, size_t count, int world_size);

}  // namespace pyccl
