// The connections of one epoch: K outgoing to the next ring neighbour, and
// the incoming ones accepted from the previous neighbour.
//
// Links are never reused across epochs: a new epoch gets fresh connections,
// so bytes of an aborted op can never be mistaken for a new op's. Shutting
// the links down is how an abort wakes every thread blocked on them.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "net/frame_endpoint.h"
#include "net/send_conn.h"
#include "net/socket.h"
#include "net/wire_format.h"

namespace pyccl::net {

struct EpochInfo {
  uint64_t epoch = 0;
  uint64_t my_id = 0;
  int rank = 0;
  int world_size = 1;
  uint64_t next_id = 0;
  std::string next_host;
  uint16_t next_port = 0;
  uint64_t prev_id = 0;
  // Liveness of the links: a sender writes a keepalive after this long
  // without traffic; a receiver that hears nothing for link_timeout_s
  // declares the link dead (a stalled path, or a hung neighbour).
  double keepalive_s = 1.0;
  double link_timeout_s = 5.0;
  // The epoch's membership key (see membership_proof.h); empty in an open run.
  std::string key;
  // Whether state fetches planned in the previous epoch may still prove
  // themselves with its key: only when every member of it is a member of
  // this one, so that a peer expelled (or gone) at this epoch loses access.
  bool keep_previous_key = true;
  // The next peer shares this host (the master says so): ask for
  // shared-memory links (shm_handshake.h) instead of plain TCP.
  bool shm = false;
  // Local address outgoing links are bound to ("": the kernel's choice).
  std::string source_host;
  // Outgoing connections of this epoch (0: the data plane's default);
  // Communicator(connections="auto") picks it per successor.
  int connections = 0;
  // Which ring of the epoch (LinkHello.ring): 0 the ring, 1 the region ring,
  // 2 the cross-region ring of a two-level all-reduce.
  uint8_t ring = 0;
};

class RingLinks final : public FrameSender {
 public:
  using BrokenFn = std::function<void(uint64_t epoch, const std::string& reason)>;

  RingLinks(EpochInfo info, int connections, BrokenFn on_broken);
  ~RingLinks() override;

  const EpochInfo& info() const { return info_; }
  int connections() const { return connections_; }
  uint64_t epoch() const { return info_.epoch; }

  // Blocks until every outgoing connection is up; fails if the link broke.
  Status wait_ready();
  // Stripe frames over the pool, about kStripeBytes per connection in turn.
  void send(const std::shared_ptr<FrameSource>& op, const DataHeader& header, const void* payload) override;

  // Incoming side: claim the slot a hello names. Returns false with `why`
  // if the hello does not fit this epoch's ring. The socket stays owned by
  // the caller; we keep its fd only to shut it down.
  bool attach_incoming(const Socket& sock, const LinkHello& hello, std::string& why);
  void detach_incoming(const Socket& sock);

  bool broken() const { return broken_.load(); }
  // Mark broken with a reason (first reason wins) and wake every thread.
  void shutdown(const std::string& reason);
  // True once the connector and all sender threads have exited.
  bool finished() const { return connector_done_.load(); }
  void join();

 private:
  void connect_all();
  void report_broken(const std::string& reason);

  const EpochInfo info_;
  const int connections_;
  const BrokenFn on_broken_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<SendConn>> out_;
  bool out_ready_ = false;
  std::string broken_reason_;
  std::atomic<bool> broken_{false};
  std::atomic<bool> connector_done_{false};
  std::vector<int> in_fds_;        // fds of attached incoming sockets (for shutdown)
  std::vector<uint8_t> in_slots_;  // which incoming slots are taken
  static constexpr uint64_t kStripeBytes = 1u << 20;
  uint64_t rr_ = 0;       // the connection frames go to now, guarded by mu_
  uint64_t striped_ = 0;  // payload bytes given to it since it was picked
  std::thread connector_;
};

}  // namespace pyccl::net
