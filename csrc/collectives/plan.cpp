#include "collectives/plan.h"

#include "collectives/op.h"
#include "kernels/reduce.h"

namespace pyccl {

uint32_t CollectivePlan::wire_length(uint32_t chunk) const { return op_.layout().chunk(chunk).length; }

char* CollectivePlan::landing(net::Phase, uint32_t chunk) { return op_.work() + op_.layout().chunk(chunk).offset; }

void CollectivePlan::send_segment(net::Phase phase, int segment, const char* base) {
  const RingLayout& L = op_.layout();
  for (uint32_t c = L.first_chunk(segment); c < L.first_chunk(segment + 1); ++c)
    op_.send(phase, c, base + L.chunk(c).offset);
}

void CollectivePlan::open(bool sends_data) {
  if (!sends_data) op_.send(net::Phase::Start, 0, op_.input());
}

size_t CollectivePlan::chunks_in(int segment) const {
  const RingLayout& L = op_.layout();
  return static_cast<size_t>(L.first_chunk(segment + 1) - L.first_chunk(segment));
}

RingPlan::RingPlan(Op& op, int owner_offset, bool reduce_scatter, bool all_gather)
    : CollectivePlan(op),
      ring_{op.rank(), op.world_size(), owner_offset},
      reduce_scatter_(reduce_scatter),
      all_gather_(all_gather) {}

bool RingPlan::receives(net::Phase phase, int segment) const {
  if (phase == net::Phase::ReduceScatter) return reduce_scatter_ && segment != ring_.first_sent();
  if (phase == net::Phase::AllGather) return all_gather_ && segment != ring_.owned();
  return false;
}

void RingPlan::fold_input(uint32_t chunk, bool owner) {
  const Chunk& ch = op_.layout().chunk(chunk);
  const size_t count = ch.length / op_.layout().elem_size();
  void* dst = op_.work() + ch.offset;
  const void* src = static_cast<const char*>(op_.input()) + ch.offset;
  if (owner) reduce_final(op_.dtype(), op_.redop(), dst, src, count, op_.world_size());
  else reduce_step(op_.dtype(), op_.redop(), dst, src, count);
}

}  // namespace pyccl
