// All-reduce for small tensors: ring all-gather of every peer's whole input,
// then each peer reduces the n inputs itself, in rank order.
//
// Why: the classic ring needs 2(n-1) sequential hops, and below a few tens of
// KiB a hop costs far more in wake-ups and round trips than in bytes. This
// takes n-1 hops (one at n = 2) for (n-1)x the ring's bytes per peer, which
// only pays while the tensor is small (see kGatherAllReduceMaxBytes).
// Every peer reduces the same n buffers in the same order with the same
// kernels, so the results are bit-identical, as the guarantee requires.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

#include "collectives/op.h"
#include "common/status.h"
#include "net/ring_links.h"

namespace pyccl {

// Tensors whose bytes x (n - 1) stay at or under this take the gather path.
// Every peer derives the choice from (size, dtype, world size) alone.
inline constexpr size_t kGatherAllReduceMaxBytes = 64u << 10;

inline bool use_gather_all_reduce(size_t bytes, int world_size) {
  return world_size > 1 && bytes * static_cast<size_t>(world_size - 1) <= kGatherAllReduceMaxBytes;
}

// `op` is a Collective::AllReduceGather op over the gathered buffer
// (op->work(), n inputs; op->input() holds this peer's). On success the
// reduction of the n inputs is in `result`, which holds one input's bytes.
Status run_gather_all_reduce(const std::shared_ptr<Op>& op, net::RingLinks& links,
                             const std::function<Status()>& publish, void* result);

}  // namespace pyccl
