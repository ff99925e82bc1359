// Ring reduce-scatter: rank r ends with segment r of the reduction (in
// op->work() at that segment's offset). n-1 steps, each chunk reduced once
// per peer and finished (AVG divided) by its owner.
#pragma once

#include <functional>
#include <memory>

#include "collectives/op.h"
#include "common/status.h"
#include "net/ring_links.h"

namespace pyccl {

Status run_ring_reduce_scatter(const std::shared_ptr<Op>& op, net::RingLinks& links,
                               const std::function<Status()>& publish);

}  // namespace pyccl
