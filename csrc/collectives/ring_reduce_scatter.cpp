#include "collectives/ring_reduce_scatter.h"

#include "collectives/ring_common.h"

namespace pyccl {

using net::Phase;
using ring::chunks_in;
using ring::mod;

Status run_ring_reduce_scatter(const std::shared_ptr<Op>& op, net::RingLinks& links,
                               const std::function<Status()>& publish) {
  const RingLayout& L = op->layout();
  const int n = op->world_size();
  const int r = op->rank();
  const char* input = static_cast<const char*>(op->input());
  char* work = op->work();

  // The first half of the all-reduce ring, shifted (owner offset 0) so that
  // rank r finishes segment r: send segment r-1 first, fold the input into
  // each partial that arrives, and stop once our own segment is complete.
  op->set_on_arrival([&](Phase phase, uint32_t c) {
    if (phase != Phase::ReduceScatter) return;
    const Chunk& ch = L.chunk(c);
    const bool owner = op->step_of(phase, static_cast<int>(ch.segment)) == n - 2;
    ring::fold_input(*op, ch, owner);
    if (!owner) links.send(op, op->header(Phase::ReduceScatter, c), work + ch.offset);
  });

  const int first = mod(r - 1, n);
  const size_t expected = L.num_chunks() - chunks_in(L, first) + (chunks_in(L, mod(r - 2, n)) == 0 ? 1 : 0);
  if (Status st = publish(); !st.ok()) return st;
  ring::open_op(op, links, chunks_in(L, first) > 0);
  ring::send_segment(op, links, Phase::ReduceScatter, first, input);
  return ring::finish(op, expected);
}

}  // namespace pyccl
