// One outgoing connection of a pool (a TCP socket, or a shared-memory ring
// with its TCP doorbell: see byte_stream.h), with its own sender thread.
//
// Large frames are queued and written by the sender thread, so K connections
// transmit in parallel while the ring driver keeps reducing. Small frames
// (latency-bound ops) are written inline by the caller when the connection
// is idle, which saves a thread hand-off per ring hop.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "net/byte_stream.h"
#include "net/frame_endpoint.h"
#include "net/socket.h"
#include "net/wire_format.h"

namespace pyccl::net {

class SendConn {
 public:
  using BrokenFn = std::function<void(const std::string& reason)>;

  SendConn(std::unique_ptr<ByteStream> stream, std::string peer_desc, uint64_t epoch, double keepalive_s, BrokenFn on_broken);
  ~SendConn();
  SendConn(const SendConn&) = delete;
  SendConn& operator=(const SendConn&) = delete;

  // Transmit one frame of `op`. The op counts it as pending until it is
  // written or dropped; a write error fails the op and breaks the link.
  void submit(const std::shared_ptr<FrameSource>& op, const DataHeader& header, const void* payload);

  // Wake the sender thread, fail queued frames; safe from any thread.
  void shutdown();
  void join();

 private:
  struct Job {
    std::shared_ptr<FrameSource> op;
    DataHeader header;
    const void* payload;
  };
  static constexpr uint32_t kInlineBytes = 64u << 10;

  void run();
  // Writes one frame; returns false (and reports) if the connection broke.
  bool write_frame(const Job& job);
  void write_keepalive();
  void report_failure(const std::string& what);

  std::unique_ptr<ByteStream> stream_;
  const std::string peer_desc_;
  const uint64_t epoch_;
  const std::chrono::duration<double> keepalive_;
  const BrokenFn on_broken_;
  std::atomic<int64_t> last_write_ns_{0};  // steady_clock time of the last frame written
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  std::atomic<bool> stopping_{false};
  bool broken_ = false;
  std::mutex write_mu_;  // one writer at a time: the sender thread or an inline caller
  std::thread thread_;
};

}  // namespace pyccl::net
