#include "collectives/ring_allreduce.h"

#include "kernels/reduce.h"

namespace pyccl {

Status run_ring_all_reduce(const std::shared_ptr<Op>& op, net::RingLinks& links) {
  using net::Phase;
  const RingLayout& L = op->layout();
  const int n = L.world_size();
  const int r = op->rank();
  const size_t elem = L.elem_size();
  const char* input = static_cast<const char*>(op->input());
  char* work = op->work();

  auto send = [&](Phase phase, uint32_t c, const char* base) {
    links.send(op, op->header(phase, c), base + L.chunk(c).offset);
  };

  // Reduce-scatter, step 0: our raw input for segment r goes to the next peer
  // straight from the caller's buffer (no copy; the input is never written).
  for (uint32_t c = L.first_chunk(r); c < L.first_chunk(r + 1); ++c) send(Phase::ReduceScatter, c, input);

  // Steps 0..n-2: a partial sum of segment (r - s - 1) arrives in `work`;
  // fold our input into it and pass it on. At the last step it is the
  // segment we own: finish it and start the all-gather with it.
  for (int s = 0; s <= n - 2; ++s) {
    const int seg = L.segment_at(r, s + 1);
    const bool owner_step = (s == n - 2);
    for (uint32_t c = L.first_chunk(seg); c < L.first_chunk(seg + 1); ++c) {
      if (!op->wait_arrived(Phase::ReduceScatter, c)) return op->status();
      const Chunk& ch = L.chunk(c);
      void* dst = work + ch.offset;
      const void* src = input + ch.offset;
      if (owner_step) {
        reduce_final(op->dtype(), op->redop(), dst, src, ch.length / elem, n);
        send(Phase::AllGather, c, work);
      } else {
        reduce_step(op->dtype(), op->redop(), dst, src, ch.length / elem);
        send(Phase::ReduceScatter, c, work);
      }
    }
  }

  // All-gather: finished segments arrive directly in `work`; forward each one
  // unchanged except the last, which has then been everywhere.
  for (int s = 0; s <= n - 2; ++s) {
    const int seg = L.segment_at(r, s);
    for (uint32_t c = L.first_chunk(seg); c < L.first_chunk(seg + 1); ++c) {
      if (!op->wait_arrived(Phase::AllGather, c)) return op->status();
      if (s < n - 2) send(Phase::AllGather, c, work);
    }
  }
  return op->status();
}

}  // namespace pyccl
