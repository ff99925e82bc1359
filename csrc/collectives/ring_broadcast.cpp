// Ring broadcast: the root's buffer flows root -> root+1 -> ... -> root-1 in
// pipelined chunks, each peer receiving straight into its buffer and
// forwarding verbatim, so every peer ends with the root's exact bytes. The
// layout is a single segment holding every chunk.
#include "collectives/collective.h"
#include "collectives/op.h"
#include "collectives/plan.h"

namespace pyccl {

using net::Phase;

namespace {

class BroadcastPlan final : public CollectivePlan {
 public:
  explicit BroadcastPlan(Op& op)
      : CollectivePlan(op),
        root_(op.rank() == op.root()),
        last_(ring_mod(op.rank() + 1, op.world_size()) == op.root()) {}

  bool receives(Phase phase, int) const override { return phase == Phase::AllGather && !root_; }

  // Every chunk but at the root; an empty broadcast still brings a start frame.
  size_t expected_arrivals() const override {
    if (root_) return 0;
    return op_.layout().num_chunks() == 0 ? 1 : op_.layout().num_chunks();
  }

  void start() override {
    if (root_) {
      open(op_.layout().num_chunks() > 0);
      send_segment(Phase::AllGather, 0, static_cast<const char*>(op_.input()));
    } else if (op_.layout().num_chunks() == 0 && !last_) {
      // An empty broadcast still passes the start frame on, so a peer that
      // disagrees about the size anywhere on the ring notices.
      op_.send(Phase::Start, 0, op_.input());
    }
  }

  void on_arrival(Phase phase, uint32_t c) override {
    if (phase == Phase::AllGather && !last_) op_.send(Phase::AllGather, c, op_.work() + op_.layout().chunk(c).offset);
  }

 private:
  const bool root_;
  const bool last_;  // our successor is the root: nothing to forward
};

std::unique_ptr<CollectivePlan> make_plan(Op& op) { return std::make_unique<BroadcastPlan>(op); }

}  // namespace

extern const CollectiveSpec kBroadcastSpec;
const CollectiveSpec kBroadcastSpec{Collective::Broadcast, "broadcast", true, false, &make_plan};

}  // namespace pyccl
