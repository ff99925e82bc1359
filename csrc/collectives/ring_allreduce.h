// Ring all-reduce = reduce-scatter followed by all-gather (Patarasuk & Yuan).
//
// Each of the n segments is reduced along the ring and finished by exactly
// one owner (ring position s-1 owns segment s), which also applies AVG's
// division; the owner's bytes are then forwarded verbatim around the ring,
// so every peer ends with bit-identical results. Work is pipelined per
// chunk: a chunk is forwarded as soon as it has been reduced, and chunks are
// striped over the connection pool.
#pragma once

#include <functional>
#include <memory>

#include "collectives/op.h"
#include "common/status.h"
#include "net/ring_links.h"

namespace pyccl {

// Drives `op` to completion over `links`. `publish` makes the op visible to
// reader threads (registers it); it is called once the op's arrival handler
// is installed. The input buffer is only read; the result lands in
// op->work(). Returns when the op finished or failed and no other thread
// touches its buffers any more.
Status run_ring_all_reduce(const std::shared_ptr<Op>& op, net::RingLinks& links,
                           const std::function<Status()>& publish);

}  // namespace pyccl
