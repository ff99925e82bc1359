// The one driver that runs every collective's plan over a ring.
//
// For any plan: bind the op to the sender, let the plan prepare its
// buffers, publish the op (readers may deliver frames from then on), let the
// plan send its start frame and first chunks, wait for the plan's expected
// arrivals (the handlers run on reader threads and do the reducing and
// forwarding), wait until no thread touches the buffers, and let the plan
// finish. The input buffer is only read; results land in op->work().
#pragma once

#include <functional>
#include <memory>

#include "collectives/op.h"
#include "common/status.h"
#include "net/frame_endpoint.h"

namespace pyccl {

// `publish` makes the op visible to reader threads (registers it).
Status run_ring(const std::shared_ptr<Op>& op, net::FrameSender& sender, const std::function<Status()>& publish);

// The two halves of run_ring, for callers that deliver frames themselves
// (the C++ unit tests): open_ring returns once the first frames are sent;
// close_ring blocks until the op is complete and quiescent.
Status open_ring(const std::shared_ptr<Op>& op, net::FrameSender& sender, const std::function<Status()>& publish);
Status close_ring(Op& op);

}  // namespace pyccl
