// Ring all-reduce of float32 with uint8 min-max quantization on the wire
// (about 4x fewer bytes). Reduce-scatter re-quantizes each partial sum per
// hop; the owner of a segment quantizes its final value once, applies
// dequantize(quantize(x)) to its own copy, and those bytes are forwarded
// verbatim in the all-gather, so every peer decodes identical bits.
// Non-finite values fail the op with a mismatch naming the cause.
#pragma once

#include <functional>
#include <memory>

#include "collectives/op.h"
#include "common/status.h"
#include "net/ring_links.h"

namespace pyccl {

Status run_ring_all_reduce_quantized(const std::shared_ptr<Op>& op, net::RingLinks& links,
                                     const std::function<Status()>& publish);

}  // namespace pyccl
