// All-reduce for small tensors: ring all-gather of every peer's whole input,
// then each peer reduces the n inputs itself, in rank order.
//
// Why: the classic ring needs 2(n-1) sequential hops, and below a few tens of
// KiB a hop costs far more in wake-ups and round trips than in bytes. This
// takes n-1 hops (one at n = 2) for (n-1)x the ring's bytes per peer, which
// only pays while the tensor is small (see kGatherAllReduceMaxBytes).
// Every peer reduces the same n buffers in the same order with the same
// kernels, so the results are bit-identical, as the guarantee requires.
//
// The plan (Collective::AllReduceGather) gathers into a buffer of its own of
// n inputs; op->input() holds this peer's, and the reduction lands in
// op->work(), which holds one input's bytes.
#pragma once

#include <cstddef>

namespace pyccl {

// Tensors whose bytes x (n - 1) stay at or under this take the gather path.
// Every peer derives the choice from (size, dtype, world size) alone.
inline constexpr size_t kGatherAllReduceMaxBytes = 64u << 10;

inline bool use_gather_all_reduce(size_t bytes, int world_size) {
  return world_size > 1 && bytes * static_cast<size_t>(world_size - 1) <= kGatherAllReduceMaxBytes;
}

}  // namespace pyccl
