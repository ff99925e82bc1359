// Small pieces shared by the ring algorithms (one algorithm per file).
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

#include "collectives/op.h"
#include "common/status.h"
#include "kernels/reduce.h"
#include "net/ring_links.h"

namespace pyccl::ring {

inline size_t chunks_in(const RingLayout& L, int segment) {
  return static_cast<size_t>(L.first_chunk(segment + 1) - L.first_chunk(segment));
}

inline int mod(int a, int n) { return ((a % n) + n) % n; }

// Send every chunk of `segment` in `phase`, from `base` (input or work).
inline void send_segment(const std::shared_ptr<Op>& op, net::RingLinks& links, net::Phase phase, int segment,
                         const char* base) {
  const RingLayout& L = op->layout();
  for (uint32_t c = L.first_chunk(segment); c < L.first_chunk(segment + 1); ++c)
    links.send(op, op->header(phase, c), base + L.chunk(c).offset);
}

// A peer's first data chunk carries the op's identity to the next peer; a
// peer that has none to send sends a payload-less start frame instead, so
// peers that disagree about the op always find out (see Phase::Start).
inline void open_op(const std::shared_ptr<Op>& op, net::RingLinks& links, bool sends_data) {
  if (!sends_data) links.send(op, op->header(net::Phase::Start, 0), op->input());
}

// Reduce-scatter's step on an arrived chunk: the partial sum in work[chunk]
// absorbs this peer's input; the segment's owner also finishes it (AVG
// divides there), once, so every peer later receives the same bytes.
inline void fold_input(Op& op, const Chunk& ch, bool owner) {
  const size_t elem = op.layout().elem_size();
  void* dst = op.work() + ch.offset;
  const void* src = static_cast<const char*>(op.input()) + ch.offset;
  if (owner) reduce_final(op.dtype(), op.redop(), dst, src, ch.length / elem, op.world_size());
  else reduce_step(op.dtype(), op.redop(), dst, src, ch.length / elem);
}

// Publish, start, wait for `expected` arrivals, then for quiescence (the
// arrival handler captures the caller's locals, and no thread may touch the
// buffers once we return).
inline Status finish(const std::shared_ptr<Op>& op, size_t expected) {
  op->wait_processed(expected);
  op->wait_quiescent();
  return op->status();
}

}  // namespace pyccl::ring
