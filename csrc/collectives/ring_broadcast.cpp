#include "collectives/ring_broadcast.h"

#include "collectives/ring_common.h"

namespace pyccl {

using net::Phase;
using ring::mod;

Status run_ring_broadcast(const std::shared_ptr<Op>& op, net::RingLinks& links,
                          const std::function<Status()>& publish) {
  // The layout has a single segment holding every chunk.
  const RingLayout& L = op->layout();
  const int n = op->world_size();
  const int r = op->rank();
  const int root = op->shape().root;
  const bool last = mod(r + 1, n) == root;  // our successor is the root: nothing to forward
  char* work = op->work();

  op->set_on_arrival([&](Phase phase, uint32_t c) {
    if (phase == Phase::AllGather && !last) links.send(op, op->header(Phase::AllGather, c), work + L.chunk(c).offset);
  });

  size_t expected = 0;
  if (r != root) expected = L.num_chunks() == 0 ? 1 : L.num_chunks();
  if (Status st = publish(); !st.ok()) return st;
  if (r == root) {
    ring::open_op(op, links, L.num_chunks() > 0);
    ring::send_segment(op, links, Phase::AllGather, 0, static_cast<const char*>(op->input()));
  } else if (L.num_chunks() == 0 && !last) {
    // An empty broadcast still passes the start frame on, so a peer that
    // disagrees about the size anywhere on the ring notices.
    links.send(op, op->header(Phase::Start, 0), op->input());
  }
  return ring::finish(op, expected);
}

}  // namespace pyccl
