// One in-flight collective as seen by the data plane.
//
// An Op is shared by three kinds of threads: the caller's thread drives its
// plan (ring_driver.h), reader threads place incoming chunks into its
// buffers, and sender threads transmit from them. The Op is the meeting
// point: chunk arrival flags, the count of outstanding sends and active
// writes (so the caller never returns while another thread still touches
// user memory), and the first failure, which wakes everybody.
//
// The Op knows no particular collective: it asks its plan (plan.h) which
// frames it may receive, where they land and what happens on arrival.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "collectives/collective.h"
#include "collectives/layout.h"
#include "collectives/plan.h"
#include "common/status.h"
#include "kernels/dtype.h"
#include "net/frame_endpoint.h"
#include "net/wire_format.h"

namespace pyccl {

struct OpKey {
  uint64_t epoch;
  uint32_t tag;
  uint64_t seq;
};

struct OpParams {
  OpKey key{};
  Collective collective = Collective::AllReduce;
  int root = 0;  // broadcast only: the rank that sends
  DType dtype = DType::Float32;
  RedOp redop = RedOp::Sum;
  const void* input = nullptr;  // only read
  void* work = nullptr;         // the result
  size_t count = 0;             // elements of the caller's tensor (see CollectiveSpec)
  int rank = 0;
  int world_size = 1;
};

class Op final : public net::FrameSource, public std::enable_shared_from_this<Op> {
 public:
  explicit Op(const OpParams& params);
  ~Op() override;

  const OpKey& key() const { return key_; }
  const CollectiveSpec& spec() const { return spec_; }
  const RingLayout& layout() const { return layout_; }
  DType dtype() const { return dtype_; }
  RedOp redop() const { return redop_; }
  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int root() const { return root_; }
  const void* input() const { return input_; }
  char* work() const { return static_cast<char*>(work_); }
  CollectivePlan& plan() { return *plan_; }
  const CollectivePlan& plan() const { return *plan_; }

  // Header template for frames this op sends.
  net::DataHeader header(net::Phase phase, uint32_t chunk) const;
  // Where this op's frames go; set by the driver before the op is published.
  void set_sender(net::FrameSender* sender) { sender_ = sender; }
  // Sends chunk c (or the start frame) in `phase`; `payload` stays valid
  // until the send is done (wait_quiescent).
  void send(net::Phase phase, uint32_t chunk, const void* payload);

  // --- receiving side (reader threads)
  // Validates a frame against this op. On success returns where its payload
  // goes and counts an active writer (call end_write afterwards). Returns
  // nullptr if the payload must be discarded: the op already failed, or the
  // frame is wrong for it, in which case the op is failed with a message.
  char* begin_write(const net::DataHeader& h, const std::string& from);
  // Ends a write begun above. If the payload arrived whole, marks the chunk
  // and runs the plan's arrival handler (still counted as an active writer,
  // so the caller's wait_quiescent() also waits for handlers).
  void end_write(const net::DataHeader& h, bool ok);

  // --- driving side (caller thread)
  // Blocks until `count` arrivals have been processed; false on failure.
  bool wait_processed(size_t count);
  size_t processed() const;
  // Blocks until no reader writes into and no sender reads from our buffers.
  void wait_quiescent();

  // --- net::FrameSource (sender threads)
  void add_pending_send() override;
  void send_done(bool ok, uint64_t bytes) override;
  bool failed() const override;
  // First failure wins; wakes every waiter.
  void fail(FailKind kind, const std::string& message) override;

  Status status() const;
  uint64_t tx_bytes() const;
  uint64_t rx_bytes() const;

 private:
  std::vector<uint8_t>& arrived(net::Phase phase) {
    return phase == net::Phase::ReduceScatter ? arrived_rs_ : arrived_ag_;
  }
  uint8_t op_byte() const;
  // Why a data frame does not fit this op, or "" (checks that need no lock).
  std::string frame_problem(const net::DataHeader& h) const;
  std::string mismatch_message(const net::DataHeader& h, const std::string& from) const;
  // Under mu_: wakes the caller if what it waits for holds now.
  void notify_if_due();

  const OpKey key_;
  const CollectiveSpec& spec_;
  const int root_;
  const DType dtype_;
  const RedOp redop_;
  const void* const input_;
  void* const work_;
  const RingLayout layout_;
  const int rank_;
  const int world_size_;
  net::FrameSender* sender_ = nullptr;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint8_t> arrived_rs_, arrived_ag_;
  size_t processed_ = 0;
  // What the caller's thread waits for, so that readers and senders wake it
  // only when that may have come true (not once per chunk: on 2 cores each
  // needless wake-up is a context switch in the middle of the ring).
  size_t wait_target_ = SIZE_MAX;
  int quiet_waiters_ = 0;
  bool start_arrived_ = false;
  int active_writers_ = 0;
  int pending_sends_ = 0;
  uint64_t tx_bytes_ = 0, rx_bytes_ = 0;
  Status status_;
  std::unique_ptr<CollectivePlan> plan_;  // last: made from the fields above
};

}  // namespace pyccl
