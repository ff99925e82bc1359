// The data plane of one peer: a listener for its ring predecessor, the links
// of the current epoch, and the ops in flight.
//
// Python drives it: set_epoch() when the master commits an epoch,
// abort_through() when the master drains one, all_reduce() per op. Every
// method may block and is called with the GIL released.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "collectives/op_registry.h"
#include "common/status.h"
#include "kernels/dtype.h"
#include "net/probe.h"
#include "net/ring_links.h"
#include "net/socket.h"
#include "state/state_server.h"

namespace pyccl {

struct OpResult {
  Status status;
  uint64_t tx_bytes = 0;
  uint64_t rx_bytes = 0;
};

class DataPlane {
 public:
  DataPlane(const std::string& host, uint16_t port, int connections);
  ~DataPlane();
  DataPlane(const DataPlane&) = delete;
  DataPlane& operator=(const DataPlane&) = delete;

  uint16_t port() const { return port_; }
  // Incoming ring links set up over shared memory so far (tests, diagnostics).
  uint64_t shm_links_accepted() const { return shm_links_accepted_.load(); }
  int connections() const { return connections_; }
  // Outgoing connections of the current epoch's link (0 before the first epoch).
  int link_connections();

  // Keepalive interval and silence timeout of data links (the master's
  // heartbeat interval and timeout); applies from the next epoch on.
  void set_link_timeouts(double keepalive_s, double link_timeout_s);
  // `sub`: the epoch's region and cross-region rings (ring 1 and 2) when a
  // two-level all-reduce is possible; their liveness settings, key, source
  // and pool size are taken from `info`.
  void set_epoch(const net::EpochInfo& info, const std::vector<net::EpochInfo>& sub = {});
  // Require every incoming connection to prove membership of the current
  // (or the previous) epoch (a run with a secret; see net/membership_proof.h).
  void set_authenticate(bool on);
  // How long a ring-link hello for an epoch we have not reached yet is held
  // (a neighbour may learn of the epoch first). Default 10 s.
  void set_hello_wait(double seconds);
  // Bind outgoing connections (links, probes) to this local address ("": any).
  void set_source_host(const std::string& host);
  // Measures the path to another peer's data port (net/probe.h); the
  // current epoch's key proves membership in a run with a secret.
  net::ProbeReport probe(const std::string& host, uint16_t port, int connections, int pings, double seconds,
                         uint64_t max_bytes, double timeout_s);
  void abort_through(uint64_t epoch, const std::string& why);
  void close();

  // Serves one accepted connection to the data port: the challenge (with
  // authentication on), the opening frame and its proof, then a ring link's
  // frames or a state fetch's requests. Called on the accept loop's worker
  // threads; tests/fuzz/ feeds it one end of a socketpair.
  void serve_incoming(net::Socket& sock);

  // Shared state this peer serves to fetchers (see state/state_server.h).
  state::StateServer& state_server() { return state_server_; }

  // Runs one ring collective over `count` elements (the full tensor: for
  // all-gather the output, for reduce-scatter the input). `input` is only
  // read; results land in `work` (each collective's file in collectives/ says
  // how it lays out its buffers).
  OpResult collective(Collective kind, int root, uint64_t epoch, uint32_t tag, uint64_t seq, const void* input,
                      void* work, size_t count, DType dtype, RedOp op);
  // All-reduce over the epoch's region and cross-region rings
  // (collectives/two_level_allreduce.h); fails if the epoch has none.
  OpResult all_reduce_two_level(uint64_t epoch, uint32_t tag, uint64_t seq, const void* input, void* work,
                                size_t count, DType dtype, RedOp op);

 private:
  void accept_loop();
  std::string key_of(uint64_t epoch);
  void refuse(const std::string& addr, const std::string& why);
  void read_frames(net::ByteStream& sock, net::RingLinks& links, const std::string& from);
  std::shared_ptr<net::RingLinks> links_for(uint64_t epoch, double timeout_s, uint8_t ring = 0);
  OpResult run_op(net::RingLinks& links, const OpParams& params);
  uint64_t current_epoch();
  void on_link_broken(uint64_t epoch, const std::string& reason);
  void reap_threads(bool all);

  const int connections_;
  net::Socket listener_;
  uint16_t port_ = 0;
  std::atomic<uint64_t> shm_links_accepted_{0};
  OpRegistry registry_;
  state::StateServer state_server_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<net::RingLinks> links_;
  std::vector<std::shared_ptr<net::RingLinks>> sub_;  // the epoch's rings 1 and 2, if any
  bool closed_ = false;
  double keepalive_s_ = 1.0;
  double link_timeout_s_ = 5.0;
  double hello_wait_s_ = 10.0;
  bool authenticate_ = false;
  std::string source_host_;
  uint64_t prev_epoch_ = 0;
  std::string prev_key_;                 // the epoch before the current one: fetches planned in it
  std::set<std::string> refused_from_;   // sources whose refusal was logged (once each)

  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::mutex workers_mu_;
  std::list<Worker> workers_;      // one per accepted connection
  std::list<int> incoming_fds_;    // accepted sockets, shut down on close
  std::thread accept_thread_;
};

}  // namespace pyccl
