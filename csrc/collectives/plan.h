// A collective's plan: everything the data plane needs to know about one
// collective, in that collective's own file.
//
// A plan says what its rank receives (which phase and segment; the op
// rejects every other frame), how many frames that makes, what goes on the
// wire for a chunk and where an arriving one lands, what to send first, and
// what to do when a chunk arrives (reduce, forward, or nothing). One driver
// (ring_driver.*) runs every plan; Op and the transport know no particular
// collective. A plan is made per op (CollectiveSpec::make_plan) and may own
// staging buffers.
//
// To add a collective: write its file (a CollectivePlan subclass and a
// CollectiveSpec), give it a wire code in collective.h and list its spec in
// collective.cpp; tests/cpp/test_plans.cpp runs every listed plan.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/status.h"
#include "net/wire_format.h"

namespace pyccl {

class Op;

class CollectivePlan {
 public:
  explicit CollectivePlan(Op& op) : op_(op) {}
  virtual ~CollectivePlan() = default;
  CollectivePlan(const CollectivePlan&) = delete;
  CollectivePlan& operator=(const CollectivePlan&) = delete;

  // --- what this rank receives (the op validates frames against it)
  // Whether chunks of `segment` may arrive in data phase `phase`.
  virtual bool receives(net::Phase phase, int segment) const = 0;
  // Frames this rank receives over the whole op: its data chunks, plus the
  // start frame of a predecessor that has no data to send.
  virtual size_t expected_arrivals() const = 0;
  // Payload bytes of chunk c's frames: the layout's, unless the plan encodes.
  virtual uint32_t wire_length(uint32_t chunk) const;
  // Where chunk c's payload lands when it arrives in `phase`.
  virtual char* landing(net::Phase phase, uint32_t chunk);

  // --- driving (see ring_driver.h for the order)
  // Caller's thread, before the op is published: nothing can arrive yet.
  virtual void prepare() {}
  // Caller's thread, once published: the start frame and the first sends.
  virtual void start() = 0;
  // A reader thread, once chunk c has fully arrived in `phase` and the op
  // has not failed. Handlers of different chunks run concurrently.
  virtual void on_arrival(net::Phase phase, uint32_t chunk) = 0;
  // Caller's thread, after every arrival, once no other thread touches the
  // buffers, if the op succeeded.
  virtual Status finish() { return Status::Ok(); }

 protected:
  // Sends every chunk of `segment` in `phase`, payloads from `base` + offset.
  void send_segment(net::Phase phase, int segment, const char* base);
  // A peer's first data chunk carries the op's identity to the next peer; a
  // peer with none to send sends a payload-less start frame instead, so
  // peers that disagree about the op always find out (see Phase::Start).
  void open(bool sends_data);
  size_t chunks_in(int segment) const;

  Op& op_;
};

inline int ring_mod(int a, int n) { return ((a % n) + n) % n; }

// Who sends what when on a ring of segments. At step s of a phase every
// rank sends one segment to its successor and receives one from its
// predecessor; rank r owns (finishes) segment r + owner_offset after
// reduce-scatter. All-reduce uses owner_offset 1 (the classic ring); the
// standalone halves use 0, so that rank r ends with (or starts from)
// segment r, as torch expects.
struct RingGeometry {
  int rank = 0;
  int world = 1;
  int owner_offset = 0;

  // The segment this rank finishes in reduce-scatter and sends first in
  // all-gather; it never receives it in all-gather.
  int owned() const { return ring_mod(rank + owner_offset, world); }
  // The segment it sends first in reduce-scatter; it never receives it there.
  int first_sent() const { return ring_mod(rank + owner_offset - 1, world); }
  // The segment received at `step` (0 .. world - 2) of a phase, and back.
  int segment_at(net::Phase phase, int step) const { return ring_mod(base(phase) - step, world); }
  int step_of(net::Phase phase, int segment) const { return ring_mod(base(phase) - segment, world); }
  // Whether a chunk received at `step` has finished its phase here: the
  // owner's last reduce-scatter step, or all-gather's last hop.
  bool last_step(int step) const { return step == world - 2; }

 private:
  int base(net::Phase phase) const { return rank + owner_offset + (phase == net::Phase::ReduceScatter ? -2 : -1); }
};

// A plan over n segments that runs reduce-scatter, all-gather or both.
class RingPlan : public CollectivePlan {
 public:
  RingPlan(Op& op, int owner_offset, bool reduce_scatter, bool all_gather);
  const RingGeometry& geometry() const { return ring_; }
  // Reduce-scatter never brings back the segment this rank sent first;
  // all-gather never brings the one it owns. Accepting either would
  // overwrite live data.
  bool receives(net::Phase phase, int segment) const override;

 protected:
  // Reduce-scatter's step on an arrived chunk: the partial sum in work
  // absorbs this peer's input; the segment's owner also finishes it (AVG
  // divides there), once, so every peer later receives the same bytes.
  void fold_input(uint32_t chunk, bool owner);
  // 1 if this rank's predecessor has no chunk of `segment`, the one it
  // sends first: it then sends a start frame instead.
  size_t start_frame_if_empty(int segment) const { return chunks_in(segment) == 0 ? 1 : 0; }

  const RingGeometry ring_;
  const bool reduce_scatter_, all_gather_;
};

}  // namespace pyccl
