// Ring all-reduce = reduce-scatter followed by all-gather (Patarasuk & Yuan).
//
// Each of the n segments is reduced along the ring and finished by exactly
// one owner (ring position s-1 owns segment s), which also applies AVG's
// division; the owner's bytes are then forwarded verbatim around the ring,
// so every peer ends with bit-identical results. Work is pipelined per
// chunk: a chunk is forwarded as soon as it has been reduced, and chunks are
// striped over the connection pool.
#include "collectives/collective.h"
#include "collectives/op.h"
#include "collectives/plan.h"

namespace pyccl {

using net::Phase;

namespace {

class AllReducePlan final : public RingPlan {
 public:
  explicit AllReducePlan(Op& op)
      : RingPlan(op, /*owner_offset=*/1, /*reduce_scatter=*/true, /*all_gather=*/true) {}

  // Peer r first sends segment r and ends up owning segment r + 1: it
  // receives every chunk but those of r (reduce-scatter) and r + 1
  // (all-gather), plus a start frame if its predecessor had nothing to send.
  size_t expected_arrivals() const override {
    const RingLayout& L = op_.layout();
    return 2 * L.num_chunks() - chunks_in(ring_.first_sent()) - chunks_in(ring_.owned()) +
           start_frame_if_empty(ring_mod(ring_.first_sent() - 1, ring_.world));
  }

  // Step 0 sends our raw input straight from the caller's buffer (no copy;
  // the input is never written).
  void start() override {
    open(chunks_in(ring_.first_sent()) > 0);
    send_segment(Phase::ReduceScatter, ring_.first_sent(), static_cast<const char*>(op_.input()));
  }

  void on_arrival(Phase phase, uint32_t c) override {
    const Chunk& ch = op_.layout().chunk(c);
    const int s = ring_.step_of(phase, static_cast<int>(ch.segment));
    if (phase == Phase::ReduceScatter) {
      // A partial sum arrived in work: fold in our input and pass it on. At
      // the last step the segment is ours: finished, it starts the all-gather.
      const bool owner = ring_.last_step(s);
      fold_input(c, owner);
      op_.send(owner ? Phase::AllGather : Phase::ReduceScatter, c, op_.work() + ch.offset);
    } else if (!ring_.last_step(s)) {
      // A finished chunk: forward it verbatim unless it has been everywhere.
      op_.send(Phase::AllGather, c, op_.work() + ch.offset);
    }
  }
};

std::unique_ptr<CollectivePlan> make_plan(Op& op) { return std::make_unique<AllReducePlan>(op); }

}  // namespace

extern const CollectiveSpec kAllReduceSpec;
const CollectiveSpec kAllReduceSpec{Collective::AllReduce, "all_reduce", false, false, &make_plan};

}  // namespace pyccl
