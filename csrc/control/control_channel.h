// The peer's master connection as the C++ core reads it, so that an op's
// verdict wakes only the thread that waits for it.
//
// Before, every `op_ok` went through Python: the control thread woke,
// parsed the msgpack map, took the Communicator's lock, updated PeerState,
// notified, and only then did the caller wake (two thread hops and the GIL
// on a 4-byte all-reduce's critical path). Here the channel owns a
// duplicate of the connection's descriptor after the handshake and reads
// it with the GIL released:
//
//   * `op_ok` frames it recognises (verdict_frames.h) are recorded in a set
//     of decided ops; the caller waiting for that op takes its key;
//   * heartbeats only count as liveness;
//   * every other frame is queued, in order, for the Python control thread
//     (`next_frame`), which parses and validates it as before.
//
// Who reads: leader/follower. The socket is read by one thread at a time,
// the *reader*. A caller waiting for its verdict becomes the reader if
// nobody is; with `preempt`, it also asks the Python control thread (the
// background reader, blocked in poll) to step aside, through an eventfd,
// so that the op_ok wakes the caller itself. The background thread reads
// only while no caller waits. Frames the caller reads for Python are
// queued and the background thread woken; decided keys for other callers
// wake those callers.
//
// Liveness is unchanged: whoever reads gives up after `silence_s` without a
// byte (the master heart-beats every fifth of that). Every ending (EOF,
// silence, a bad length, an I/O error, `end()`) is final and wakes every
// waiter; Python learns why from `next_frame`.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "control/verdict_frames.h"

namespace pyccl::control {

enum class ChannelEnd : int {
  None = 0,     // not ended (next_frame: a frame)
  Closed = 1,   // the master closed the connection
  Silent = 2,   // nothing from the master for silence_s
  Invalid = 3,  // a frame length outside (0, kMaxFrameBytes]
  Error = 4,    // a socket error (reading or sending)
  Stopped = 5,  // end() was called (close, or Python rejected a frame)
};

enum class WaitResult : int {
  Decided = 0,  // op_ok for the key arrived; the key is consumed
  Moved = 1,    // the generation moved (Python changed the state): look again
  Ended = 2,    // the channel ended: wait on Python's state instead
};

class ControlChannel {
 public:
  // Takes a duplicate of `fd` (the caller keeps its own descriptor).
  ControlChannel(int fd, double silence_s, bool preempt);
  ~ControlChannel();
  ControlChannel(const ControlChannel&) = delete;
  ControlChannel& operator=(const ControlChannel&) = delete;

  // Send one encoded frame (length prefix included); thread-safe. A failure
  // ends the channel (a partial frame would corrupt the stream) and
  // returns false.
  bool send(const std::string& frame);

  // Send `done` for `key`, then wait(key, gen). One call, one GIL release.
  WaitResult done_and_wait(const VerdictKey& key, uint64_t gen);
  // Wait until op_ok for `key` arrives, generation() != gen, or the end.
  WaitResult wait(const VerdictKey& key, uint64_t gen);

  uint64_t generation();
  // Bump the generation and wake every waiting caller (Python changed what
  // they wait for: a drain, an epoch, a loss).
  void wake();

  // The background reader: the next frame body for Python; or, once the
  // channel ended and every queued frame was taken, the end and its reason.
  ChannelEnd next_frame(std::string* body);

  // Decided keys no caller has taken yet (Python applies them, in order,
  // before the next frame it handles, and before a loss).
  std::vector<VerdictKey> take_decided();

  // A key wait() returned Decided for stays "unrecorded" until the caller
  // has recorded the op_ok in Python's state: a failover's resume built
  // meanwhile must still report the op committed.
  void recorded(const VerdictKey& key);
  std::vector<VerdictKey> unrecorded();

  // End the channel (idempotent; the first reason stays) and wake everyone.
  void end(ChannelEnd kind, const std::string& why);
  bool ended();

 private:
  enum class Role { None, Background, Caller };
  using Clock = std::chrono::steady_clock;

  void read_once(std::unique_lock<std::mutex>& lk);
  size_t parse_frames(std::vector<VerdictKey>* oks, std::vector<std::string>* frames, std::string* invalid);
  void release_role(std::unique_lock<std::mutex>& lk);
  void end_locked(ChannelEnd kind, const std::string& why);

  int fd_ = -1;
  int wake_fd_ = -1;  // eventfd: the reader must look at the state (preemption, generation, end)
  const std::chrono::nanoseconds silence_;
  const bool preempt_;

  std::mutex send_mu_;

  std::mutex mu_;
  std::condition_variable callers_cv_;
  std::condition_variable background_cv_;
  Role role_ = Role::None;
  int callers_waiting_ = 0;  // callers waiting for a key or the reader's role
  bool preempt_requested_ = false;
  uint64_t gen_ = 0;
  std::unordered_set<VerdictKey, VerdictKeyHash> decided_;
  std::unordered_set<VerdictKey, VerdictKeyHash> unrecorded_;  // taken by wait(), not yet recorded()
  std::deque<std::string> queue_;  // frames for Python, in arrival order
  ChannelEnd end_ = ChannelEnd::None;
  std::string end_reason_;
  Clock::time_point last_rx_;

  // Bytes of frames not yet complete; touched only by the reader.
  std::vector<uint8_t> rbuf_;
  size_t rlen_ = 0;
};

}  // namespace pyccl::control
