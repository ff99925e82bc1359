// Ring reduce-scatter: rank r ends with segment r of the reduction (in
// op->work() at that segment's offset). n-1 steps, each chunk reduced once
// per peer and finished (AVG divided) by its owner.
#include "collectives/collective.h"
#include "collectives/op.h"
#include "collectives/plan.h"

namespace pyccl {

using net::Phase;

namespace {

// The first half of the all-reduce ring, shifted (owner offset 0) so that
// rank r finishes segment r: send segment r-1 first, fold the input into
// each partial that arrives, and stop once our own segment is complete.
class ReduceScatterPlan final : public RingPlan {
 public:
  explicit ReduceScatterPlan(Op& op)
      : RingPlan(op, /*owner_offset=*/0, /*reduce_scatter=*/true, /*all_gather=*/false) {}

  size_t expected_arrivals() const override {
    return op_.layout().num_chunks() - chunks_in(ring_.first_sent()) +
           start_frame_if_empty(ring_mod(ring_.first_sent() - 1, ring_.world));
  }

  void start() override {
    open(chunks_in(ring_.first_sent()) > 0);
    send_segment(Phase::ReduceScatter, ring_.first_sent(), static_cast<const char*>(op_.input()));
  }

  void on_arrival(Phase phase, uint32_t c) override {
    if (phase != Phase::ReduceScatter) return;
    const Chunk& ch = op_.layout().chunk(c);
    const bool owner = ring_.last_step(ring_.step_of(phase, static_cast<int>(ch.segment)));
    fold_input(c, owner);
    if (!owner) op_.send(Phase::ReduceScatter, c, op_.work() + ch.offset);
  }
};

std::unique_ptr<CollectivePlan> make_plan(Op& op) { return std::make_unique<ReduceScatterPlan>(op); }

}  // namespace

extern const CollectiveSpec kReduceScatterSpec;
const CollectiveSpec kReduceScatterSpec{Collective::ReduceScatter, "reduce_scatter", false, false, &make_plan};

}  // namespace pyccl
