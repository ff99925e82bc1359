#include "collectives/ring_allgather.h"

#include <cstring>

#include "collectives/ring_common.h"

namespace pyccl {

using net::Phase;
using ring::chunks_in;
using ring::mod;

Status run_ring_all_gather(const std::shared_ptr<Op>& op, net::RingLinks& links,
                           const std::function<Status()>& publish) {
  const RingLayout& L = op->layout();
  const int n = op->world_size();
  const int r = op->rank();
  char* work = op->work();

  // Our own segment goes into place before anything can arrive next to it.
  if (chunks_in(L, r) > 0) {
    const Chunk& first = L.chunk(L.first_chunk(r));
    const Chunk& last = L.chunk(L.first_chunk(r + 1) - 1);
    const size_t bytes = last.offset + last.length - first.offset;
    if (work + first.offset != op->input()) std::memmove(work + first.offset, op->input(), bytes);
  }

  // The second half of the all-reduce ring with owner offset 0: forward
  // every segment that arrives until it has been everywhere.
  op->set_on_arrival([&](Phase phase, uint32_t c) {
    if (phase != Phase::AllGather) return;
    const Chunk& ch = L.chunk(c);
    if (op->step_of(phase, static_cast<int>(ch.segment)) < n - 2)
      links.send(op, op->header(Phase::AllGather, c), work + ch.offset);
  });

  const size_t expected = L.num_chunks() - chunks_in(L, r) + (chunks_in(L, mod(r - 1, n)) == 0 ? 1 : 0);
  if (Status st = publish(); !st.ok()) return st;
  ring::open_op(op, links, chunks_in(L, r) > 0);
  ring::send_segment(op, links, Phase::AllGather, r, work);
  return ring::finish(op, expected);
}

}  // namespace pyccl
