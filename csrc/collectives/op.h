// One in-flight collective as seen by the data plane.
//
// An Op is shared by three kinds of threads: the caller's thread drives the
// ring algorithm, reader threads place incoming chunks into its buffers, and
// sender threads transmit from them. The Op is the meeting point: chunk
// arrival flags, the count of outstanding sends and active writes (so the
// caller never returns while another thread still touches user memory), and
// the first failure, which wakes everybody.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

#include "collectives/layout.h"
#include "common/status.h"
#include "kernels/dtype.h"
#include "net/wire_format.h"

namespace pyccl {

struct OpKey {
  uint64_t epoch;
  uint32_t tag;
  uint64_t seq;
};

// Which collective an op is. Travels in the high nibble of the header's
// op byte, so peers that call different collectives get a mismatch.
// AllReduceGather is how the data plane runs a small all_reduce (see
// gather_allreduce.h): its own value, so that a peer that picked the ring
// for the same call (it saw another size) gets a mismatch, not garbage.
enum class Collective : uint8_t {
  AllReduce = 0,
  ReduceScatter = 1,
  AllGather = 2,
  Broadcast = 3,
  AllReduceQ8 = 4,
  AllReduceGather = 5,
};
const char* collective_name(Collective c);
// Bytes of the caller's tensor for an op whose layout spans `total_bytes`
// (the gathered buffer for AllReduceGather), for error messages.
uint64_t call_bytes(Collective c, uint64_t total_bytes, uint32_t world_size);

// Where an op's ring starts: peer r owns segment (r + owner_offset) after
// reduce-scatter, and sends segment (r + owner_offset - 1) first. All-reduce
// uses 1 (the classic ring); standalone reduce-scatter and all-gather use 0
// so that rank r ends with (or starts from) segment r, as torch expects.
struct RingShape {
  Collective collective = Collective::AllReduce;
  int owner_offset = 1;
  int root = 0;  // broadcast only: the rank that sends
};

class Op {
 public:
  Op(OpKey key, RingShape shape, DType dtype, RedOp redop, const void* input, void* work, RingLayout layout, int rank,
     int world_size);

  const OpKey& key() const { return key_; }
  const RingLayout& layout() const { return layout_; }
  DType dtype() const { return dtype_; }
  RedOp redop() const { return redop_; }
  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  const RingShape& shape() const { return shape_; }
  // Quantized ops (AllReduceQ8) carry uint8 codes on the wire: chunk c's
  // frame is quantized_bytes(elements of c) long and lands in a per-phase
  // staging buffer instead of the work buffer.
  bool quantized() const { return shape_.collective == Collective::AllReduceQ8; }
  uint32_t wire_length(uint32_t chunk) const;
  uint8_t* q_recv(net::Phase phase, uint32_t chunk);
  uint8_t* q_send(uint32_t chunk);
  // Segment this peer receives at a phase's step s, and the inverse.
  int segment_received(net::Phase phase, int step) const;
  int step_of(net::Phase phase, int segment) const;
  const void* input() const { return input_; }
  char* work() const { return static_cast<char*>(work_); }

  // Header template for frames this op sends.
  net::DataHeader header(net::Phase phase, uint32_t chunk) const;

  // --- receiving side (reader threads)
  // Validates a frame against this op. On success returns where its payload
  // goes and counts an active writer (call end_write afterwards). Returns
  // nullptr if the payload must be discarded: the op already failed, or the
  // frame is wrong for it, in which case the op is failed with a message.
  char* begin_write(const net::DataHeader& h, const std::string& from);
  // Ends a write begun above. If the payload arrived whole, marks the chunk
  // and runs the arrival handler (still counted as an active writer, so the
  // caller's wait_quiescent() also waits for handlers).
  void end_write(const net::DataHeader& h, bool ok);

  // What the algorithm does with a chunk once it has fully arrived. It runs
  // on the reader thread that received the chunk, so reductions and
  // forwarding spread over the K connections' threads and need no hand-off
  // to the caller's thread. Set before the op is registered.
  using ArrivalFn = std::function<void(net::Phase phase, uint32_t chunk)>;
  void set_on_arrival(ArrivalFn fn) { on_arrival_ = std::move(fn); }
  // --- driving side (caller thread)
  // Blocks until `count` arrivals have been processed; false on failure.
  bool wait_processed(size_t count);
  void add_pending_send();
  void send_done(bool ok, uint64_t bytes);
  // Blocks until no reader writes into and no sender reads from our buffers.
  void wait_quiescent();

  // First failure wins; wakes every waiter.
  void fail(FailKind kind, const std::string& message);
  Status status() const;
  bool failed() const;

  uint64_t tx_bytes() const;
  uint64_t rx_bytes() const;

 private:
  std::vector<uint8_t>& arrived(net::Phase phase) { return phase == net::Phase::ReduceScatter ? arrived_rs_ : arrived_ag_; }

  // Whether this peer may receive a chunk of `segment` in `phase`.
  bool may_receive(net::Phase phase, int segment) const;
  uint8_t op_byte() const;

  const OpKey key_;
  const RingShape shape_;
  const DType dtype_;
  const RedOp redop_;
  const void* const input_;
  void* const work_;
  const RingLayout layout_;
  const int rank_;
  const int world_size_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint8_t> arrived_rs_, arrived_ag_;
  std::vector<uint8_t> q_rs_, q_ag_, q_send_;  // quantized staging (empty otherwise)
  size_t q_offset(uint32_t chunk) const;
  ArrivalFn on_arrival_;
  size_t processed_ = 0;
  bool start_arrived_ = false;
  int active_writers_ = 0;
  int pending_sends_ = 0;
  uint64_t tx_bytes_ = 0, rx_bytes_ = 0;
  Status status_;
};

}  // namespace pyccl
