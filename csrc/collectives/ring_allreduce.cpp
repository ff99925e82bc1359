// Ring all-reduce = reduce-scatter followed by all-gather (Patarasuk & Yuan).
//
// Each of the n segments is reduced along the ring and finished by exactly
// one owner (ring position s-1 owns segment s), which also applies AVG's
// division; the owner's bytes are then forwarded verbatim around the ring,
// so every peer ends with bit-identical results. Work is pipelined per
// chunk: a chunk is forwarded as soon as it has been reduced, and chunks are
// striped over the connection pool.
//
// In place (OpParams::save set, work == the caller's buffer) the result is
// written straight into the caller's buffer, and the original of every
// chunk is kept in `save` just before that chunk is first overwritten, in
// the same pass that touches it anyway: the segment sent first is copied
// chunk by chunk right before it is sent; a reduce-scatter arrival lands in
// save, and the fold leaves the sum in the caller's buffer and the original
// in save (a swap, block by block, so both stay in cache). All-gather
// chunks then land on chunks whose originals are already saved: a chunk's
// all-gather copy can only arrive after this peer folded (or first sent)
// it. A failure puts the saved originals back (undo); a verdict that fails
// an op that succeeded here copies save back whole (Python's WorkBuffers).
// This replaces the copy of the whole result into the input after the
// verdict, a cold pass over two buffers, by an extra write in passes that
// run anyway.
#include <algorithm>
#include <cstring>
#include <vector>

#include "collectives/collective.h"
#include "collectives/op.h"
#include "collectives/plan.h"
#include "kernels/reduce.h"

namespace pyccl {

using net::Phase;

namespace {

class AllReducePlan final : public RingPlan {
 public:
  explicit AllReducePlan(Op& op)
      : RingPlan(op, /*owner_offset=*/1, /*reduce_scatter=*/true, /*all_gather=*/true),
        in_place_(op.save() != nullptr),
        saved_(in_place_ ? op.layout().num_chunks() : 0, 0) {}

  // Peer r first sends segment r and ends up owning segment r + 1: it
  // receives every chunk but those of r (reduce-scatter) and r + 1
  // (all-gather), plus a start frame if its predecessor had nothing to send.
  size_t expected_arrivals() const override {
    const RingLayout& L = op_.layout();
    return 2 * L.num_chunks() - chunks_in(ring_.first_sent()) - chunks_in(ring_.owned()) +
           start_frame_if_empty(ring_mod(ring_.first_sent() - 1, ring_.world));
  }

  // Step 0 sends our raw input straight from the caller's buffer (no copy;
  // the input is never written).
  void start() override {
    open(chunks_in(ring_.first_sent()) > 0);
    if (!in_place_) {
      send_segment(Phase::ReduceScatter, ring_.first_sent(), static_cast<const char*>(op_.input()));
      return;
    }
    // In place: all-gather will overwrite this segment; save each chunk
    // before it leaves (its all-gather copy cannot come back before that).
    const RingLayout& L = op_.layout();
    for (uint32_t c = L.first_chunk(ring_.first_sent()); c < L.first_chunk(ring_.first_sent() + 1); ++c) {
      const Chunk& ch = L.chunk(c);
      std::memcpy(op_.save() + ch.offset, op_.work() + ch.offset, ch.length);
      saved_[c] = 1;
      op_.send(Phase::ReduceScatter, c, op_.work() + ch.offset);
    }
  }

  // In place, a partial sum lands in save (the caller's buffer still holds
  // the original there); all-gather chunks land in the caller's buffer.
  char* landing(Phase phase, uint32_t c) override {
    if (in_place_ && phase == Phase::ReduceScatter) return op_.save() + op_.layout().chunk(c).offset;
    return CollectivePlan::landing(phase, c);
  }

  void undo() override {
    const RingLayout& L = op_.layout();
    for (uint32_t c = 0; c < saved_.size(); ++c) {
      if (saved_[c] == 0) continue;
      const Chunk& ch = L.chunk(c);
      std::memcpy(op_.work() + ch.offset, op_.save() + ch.offset, ch.length);
    }
  }

  void on_arrival(Phase phase, uint32_t c) override {
    const Chunk& ch = op_.layout().chunk(c);
    const int s = ring_.step_of(phase, static_cast<int>(ch.segment));
    if (phase == Phase::ReduceScatter) {
      // A partial sum arrived in work: fold in our input and pass it on. At
      // the last step the segment is ours: finished, it starts the all-gather.
      const bool owner = ring_.last_step(s);
      if (in_place_) {
        fold_swap(c, owner);
      } else {
        fold_input(c, owner);
      }
      op_.send(owner ? Phase::AllGather : Phase::ReduceScatter, c, op_.work() + ch.offset);
    } else if (!ring_.last_step(s)) {
      // A finished chunk: forward it verbatim unless it has been everywhere.
      op_.send(Phase::AllGather, c, op_.work() + ch.offset);
    }
  }

 private:
  // save holds the partial sum that arrived, the caller's buffer the
  // original: afterwards the caller's buffer holds op(partial, original)
  // (the same kernel call, operands and order as fold_input, so the bits
  // are the same) and save the original. Blocks small enough for L1.
  void fold_swap(uint32_t c, bool owner) {
    constexpr size_t kBlock = 16u << 10;  // a multiple of every element size
    alignas(64) char original[kBlock];
    const Chunk& ch = op_.layout().chunk(c);
    const size_t elem = op_.layout().elem_size();
    char* mine = op_.work() + ch.offset;
    char* kept = op_.save() + ch.offset;
    for (size_t off = 0; off < ch.length; off += kBlock) {
      const size_t len = std::min<size_t>(kBlock, ch.length - off);
      std::memcpy(original, mine + off, len);
      if (owner) reduce_final(op_.dtype(), op_.redop(), kept + off, mine + off, len / elem, op_.world_size());
      else reduce_step(op_.dtype(), op_.redop(), kept + off, mine + off, len / elem);
      std::memcpy(mine + off, kept + off, len);
      std::memcpy(kept + off, original, len);
    }
    saved_[c] = 1;
  }

  const bool in_place_;
  // Chunks whose original is in save (each written by one thread; read by
  // undo() after the op is quiescent, which orders it after every writer).
  std::vector<uint8_t> saved_;
};

std::unique_ptr<CollectivePlan> make_plan(Op& op) { return std::make_unique<AllReducePlan>(op); }

}  // namespace

extern const CollectiveSpec kAllReduceSpec;
const CollectiveSpec kAllReduceSpec{Collective::AllReduce, "all_reduce", false, false, &make_plan};

}  // namespace pyccl
