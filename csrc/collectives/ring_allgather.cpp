#include "collectives/ring_allgather.h"

#include <cstring>

#include "collectives/collective.h"
#include "collectives/op.h"

namespace pyccl {

using net::Phase;

// The second half of the all-reduce ring with owner offset 0: forward every
// segment that arrives until it has been everywhere.
AllGatherPlan::AllGatherPlan(Op& op)
    : RingPlan(op, /*owner_offset=*/0, /*reduce_scatter=*/false, /*all_gather=*/true), buf_(op.work()) {}

size_t AllGatherPlan::expected_arrivals() const {
  return op_.layout().num_chunks() - chunks_in(ring_.owned()) +
         start_frame_if_empty(ring_mod(ring_.owned() - 1, ring_.world));
}

char* AllGatherPlan::landing(Phase, uint32_t chunk) { return buf_ + op_.layout().chunk(chunk).offset; }

// Our own segment goes into place before anything can arrive next to it.
void AllGatherPlan::prepare() {
  const RingLayout& L = op_.layout();
  const int own = ring_.owned();
  if (chunks_in(own) == 0) return;
  const Chunk& first = L.chunk(L.first_chunk(own));
  const Chunk& last = L.chunk(L.first_chunk(own + 1) - 1);
  const size_t bytes = last.offset + last.length - first.offset;
  if (buf_ + first.offset != op_.input()) std::memmove(buf_ + first.offset, op_.input(), bytes);
}

void AllGatherPlan::start() {
  open(chunks_in(ring_.owned()) > 0);
  send_segment(Phase::AllGather, ring_.owned(), buf_);
}

void AllGatherPlan::on_arrival(Phase phase, uint32_t c) {
  if (phase != Phase::AllGather) return;
  const Chunk& ch = op_.layout().chunk(c);
  const int step = ring_.step_of(phase, static_cast<int>(ch.segment));
  if (!ring_.last_step(step)) op_.send(Phase::AllGather, c, buf_ + ch.offset);
}

namespace {
std::unique_ptr<CollectivePlan> make_plan(Op& op) { return std::make_unique<AllGatherPlan>(op); }
}  // namespace

extern const CollectiveSpec kAllGatherSpec;
const CollectiveSpec kAllGatherSpec{Collective::AllGather, "all_gather", false, false, &make_plan};

}  // namespace pyccl
