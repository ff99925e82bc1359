#include "collectives/ring_allreduce.h"

#include "collectives/ring_common.h"

namespace pyccl {

using net::Phase;
using ring::chunks_in;
using ring::mod;

Status run_ring_all_reduce(const std::shared_ptr<Op>& op, net::RingLinks& links,
                           const std::function<Status()>& publish) {
  const RingLayout& L = op->layout();
  const int n = op->world_size();
  const int r = op->rank();
  const char* input = static_cast<const char*>(op->input());
  char* work = op->work();

  // Runs on the reader thread that received the chunk (see Op::ArrivalFn),
  // so reductions and forwarding spread over the connections' threads.
  op->set_on_arrival([&](Phase phase, uint32_t c) {
    const Chunk& ch = L.chunk(c);
    const int s = op->step_of(phase, static_cast<int>(ch.segment));
    if (phase == Phase::ReduceScatter) {
      // A partial sum arrived in `work`: fold in our input and pass it on.
      // At the last step the segment is ours: finished, it starts the
      // all-gather.
      const bool owner = (s == n - 2);
      ring::fold_input(*op, ch, owner);
      links.send(op, op->header(owner ? Phase::AllGather : Phase::ReduceScatter, c), work + ch.offset);
    } else if (s < n - 2) {
      // A finished chunk: forward it verbatim unless it has been everywhere.
      links.send(op, op->header(Phase::AllGather, c), work + ch.offset);
    }
  });

  // Peer r first sends segment r and ends up owning segment r + 1: it
  // receives every chunk but those of r (reduce-scatter) and r + 1
  // (all-gather), plus a start frame if its predecessor had nothing to send.
  const size_t expected = 2 * L.num_chunks() - chunks_in(L, r) - chunks_in(L, mod(r + 1, n)) +
                          (chunks_in(L, mod(r - 1, n)) == 0 ? 1 : 0);
  if (Status st = publish(); !st.ok()) return st;
  ring::open_op(op, links, chunks_in(L, r) > 0);
  // Step 0 sends our raw input straight from the caller's buffer (no copy;
  // the input is never written).
  ring::send_segment(op, links, Phase::ReduceScatter, r, input);
  return ring::finish(op, expected);
}

}  // namespace pyccl
