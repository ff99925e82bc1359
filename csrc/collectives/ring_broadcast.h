// Ring broadcast: the root's buffer flows root -> root+1 -> ... -> root-1 in
// pipelined chunks, each peer receiving straight into its buffer and
// forwarding verbatim, so every peer ends with the root's exact bytes.
#pragma once

#include <functional>
#include <memory>

#include "collectives/op.h"
#include "common/status.h"
#include "net/ring_links.h"

namespace pyccl {

Status run_ring_broadcast(const std::shared_ptr<Op>& op, net::RingLinks& links,
                          const std::function<Status()>& publish);

}  // namespace pyccl
