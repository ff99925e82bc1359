#include "collectives/ring_allreduce.h"

#include "kernels/reduce.h"

namespace pyccl {

Status run_ring_all_reduce(const std::shared_ptr<Op>& op, net::RingLinks& links, const std::function<Status()>& publish) {
  using net::Phase;
  const RingLayout& L = op->layout();
  const int n = L.world_size();
  const int r = op->rank();
  const size_t elem = L.elem_size();
  const char* input = static_cast<const char*>(op->input());
  char* work = op->work();

  // Which ring step a chunk belongs to follows from its segment: peer r
  // receives segment (r - s - 1) at reduce-scatter step s and segment (r - s)
  // at all-gather step s.
  auto step_of = [n, r](Phase phase, uint32_t seg) {
    const int base = phase == Phase::ReduceScatter ? r - 1 : r;
    return ((base - static_cast<int>(seg)) % n + n) % n;
  };

  // Runs on the reader thread that received the chunk (see Op::ArrivalFn).
  op->set_on_arrival([&](Phase phase, uint32_t c) {
    const Chunk& ch = L.chunk(c);
    const int s = step_of(phase, ch.segment);
    if (phase == Phase::ReduceScatter) {
      // A partial sum arrived in `work`: fold in our input and pass it on.
      // At the last step the segment is ours: finish it (AVG divides here)
      // and start its all-gather.
      void* dst = work + ch.offset;
      const void* src = input + ch.offset;
      if (s == n - 2) {
        reduce_final(op->dtype(), op->redop(), dst, src, ch.length / elem, n);
        links.send(op, op->header(Phase::AllGather, c), work + ch.offset);
      } else {
        reduce_step(op->dtype(), op->redop(), dst, src, ch.length / elem);
        links.send(op, op->header(Phase::ReduceScatter, c), work + ch.offset);
      }
    } else if (s < n - 2) {
      // A finished chunk arrived: forward it verbatim unless it has been
      // everywhere already.
      links.send(op, op->header(Phase::AllGather, c), work + ch.offset);
    }
  });

  // A peer's first reduce-scatter chunk carries the op's identity; only a
  // peer whose own segment is empty sends a payload-less start frame
  // instead (see Phase::Start), so one of the two always reaches the next
  // peer and a disagreement is always noticed.
  auto chunks_in = [&](int seg) { return static_cast<size_t>(L.first_chunk(seg + 1) - L.first_chunk(seg)); };
  const int prev = (r - 1 + n) % n;
  // Every chunk except those of our own segment (never received in
  // reduce-scatter) and of the segment we own (never received in
  // all-gather), exactly once per phase; plus the start frame if the
  // previous peer's segment is empty.
  const size_t expected = 2 * L.num_chunks() - chunks_in(r) - chunks_in((r + 1) % n) + (chunks_in(prev) == 0 ? 1 : 0);

  // Only now may readers find the op: its handler is in place.
  if (Status st = publish(); !st.ok()) return st;

  if (chunks_in(r) == 0) links.send(op, op->header(Phase::Start, 0), input);

  // Reduce-scatter step 0: our raw input for segment r goes to the next peer
  // straight from the caller's buffer (no copy; the input is never written).
  for (uint32_t c = L.first_chunk(r); c < L.first_chunk(r + 1); ++c)
    links.send(op, op->header(Phase::ReduceScatter, c), input + L.chunk(c).offset);

  op->wait_processed(expected);
  // The handler captures this frame's locals: no reader may still run it
  // when we return, and none may still write into or send from the buffers.
  op->wait_quiescent();
  return op->status();
}

}  // namespace pyccl
