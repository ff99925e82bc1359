// Ring all-gather: rank r contributes segment r; every rank ends with all
// segments in op->work(). n-1 steps; chunks are forwarded verbatim.
#pragma once

#include <functional>
#include <memory>

#include "collectives/op.h"
#include "common/status.h"
#include "net/ring_links.h"

namespace pyccl {

// op->input() holds this rank's segment alone (segment-sized); it is copied
// into its place in op->work() first.
Status run_ring_all_gather(const std::shared_ptr<Op>& op, net::RingLinks& links,
                           const std::function<Status()>& publish);

}  // namespace pyccl
