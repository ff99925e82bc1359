#include "net/ring_links.h"

#include "net/membership_proof.h"
#include "net/shm_handshake.h"

#include <sys/socket.h>

#include <algorithm>
#include <chrono>

#include "common/log.h"

namespace pyccl::net {

RingLinks::RingLinks(EpochInfo info, int connections, BrokenFn on_broken)
    : info_(std::move(info)), connections_(connections), on_broken_(std::move(on_broken)) {
  if (info_.world_size > 1) {
    connector_ = std::thread([this] { connect_all(); });
  } else {
    out_ready_ = true;
    connector_done_ = true;
  }
}

RingLinks::~RingLinks() {
  shutdown("the links were destroyed");
  join();
}

void RingLinks::connect_all() {
  const std::string desc = "peer " + std::to_string(info_.next_id) + " (" + info_.next_host + ":" +
                           std::to_string(info_.next_port) + ")";
  // The neighbour's listener is up for its whole life, but it may still be a
  // few milliseconds from learning this epoch; it holds early hellos until
  // then. Retries cover transient refusals (a restarting network path).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  std::string last_error;
  for (int i = 0; i < connections_ && !broken_;) {
    try {
      Socket s = connect_tcp(info_.next_host, info_.next_port, 1.0, info_.source_host);
      LinkHello hello;
      hello.epoch = info_.epoch;
      hello.from_peer = info_.my_id;
      hello.to_peer = info_.next_id;
      hello.conn_index = static_cast<uint32_t>(i);
      hello.conn_count = static_cast<uint32_t>(connections_);
      if (info_.shm) hello.reserved[0] = kLinkWantsShm;
      hello.ring = info_.ring;
      if (info_.key.empty()) {
        s.send_all(&hello, sizeof(hello));
      } else {
        s.set_recv_timeout(info_.link_timeout_s);
        send_opening(s, info_.key, &hello, sizeof(hello));
      }
      std::unique_ptr<ByteStream> stream;
      if (info_.shm) stream = initiate_shm(std::move(s), shm_ring_bytes(), info_.link_timeout_s);
      else stream = std::make_unique<Socket>(std::move(s));
      auto conn = std::make_unique<SendConn>(std::move(stream), desc, info_.epoch, info_.keepalive_s,
                                             [this](const std::string& why) { report_broken(why); });
      std::lock_guard<std::mutex> lock(mu_);
      if (broken_) {
        conn->shutdown();
        out_.push_back(std::move(conn));
        break;
      }
      out_.push_back(std::move(conn));
      ++i;
    } catch (const SocketError& e) {
      last_error = e.what();
      if (std::chrono::steady_clock::now() > deadline) {
        report_broken("cannot connect to " + desc + ": " + last_error);
        break;
      }
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, std::chrono::milliseconds(50), [&] { return broken_.load(); });
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    out_ready_ = static_cast<int>(out_.size()) == connections_ && !broken_;
    cv_.notify_all();
  }
  connector_done_ = true;
}

Status RingLinks::wait_ready() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return out_ready_ || broken_ || connector_done_; });
  if (out_ready_ && !broken_) return Status::Ok();
  return Status::Fail(FailKind::Peer, broken_reason_.empty() ? "the ring links of this epoch are down" : broken_reason_);
}

void RingLinks::send(const std::shared_ptr<FrameSource>& op, const DataHeader& header, const void* payload) {
  SendConn* conn = nullptr;
  std::string why;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!broken_ && out_ready_) {
      // Over TCP, round-robin frame by frame. Over shared memory, by
      // volume: a connection takes frames until it was given kStripeBytes,
      // then the next one does. Large ops (chunks of 1 MiB) still go
      // round-robin; a 1 MiB op (64 KiB chunks) stays on one ring instead
      // of waking K reader threads on the other side for two frames each
      // (on 2 cores that made 4 connections slower than 1). Several TCP
      // connections exist for bandwidth (windows, WAN paths); several
      // rings only spread the reducing over threads, which pays off only
      // for large ops.
      if (striped_ >= (info_.shm ? kStripeBytes : 1)) {
        ++rr_;
        striped_ = 0;
      }
      conn = out_[rr_ % out_.size()].get();
      striped_ += std::max<uint64_t>(header.length, 1);
    } else {
      why = broken_reason_.empty() ? "the ring links of this epoch are down" : broken_reason_;
    }
  }
  if (conn == nullptr) {
    op->fail(FailKind::Peer, why);
    return;
  }
  conn->submit(op, header, payload);
}

bool RingLinks::attach_incoming(const Socket& sock, const LinkHello& hello, std::string& why) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_) {
    why = "the epoch's links are closed";
    return false;
  }
  if (info_.world_size < 2 || hello.from_peer != info_.prev_id || hello.to_peer != info_.my_id) {
    why = "peer " + std::to_string(hello.from_peer) + " is not this peer's ring predecessor in epoch " +
          std::to_string(info_.epoch);
    return false;
  }
  if (in_slots_.empty()) in_slots_.assign(hello.conn_count, 0);
  if (hello.conn_count != in_slots_.size() || hello.conn_index >= in_slots_.size() || in_slots_[hello.conn_index]) {
    why = "connection slot " + std::to_string(hello.conn_index) + "/" + std::to_string(hello.conn_count) +
          " is invalid or taken";
    return false;
  }
  in_slots_[hello.conn_index] = 1;
  in_fds_.push_back(sock.fd());
  return true;
}

void RingLinks::detach_incoming(const Socket& sock) {
  std::lock_guard<std::mutex> lock(mu_);
  in_fds_.erase(std::remove(in_fds_.begin(), in_fds_.end(), sock.fd()), in_fds_.end());
}

void RingLinks::report_broken(const std::string& reason) {
  bool first = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    first = !broken_;
  }
  if (first) on_broken_(info_.epoch, reason);
  shutdown(reason);
}

void RingLinks::shutdown(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!broken_) {
    broken_reason_ = reason;
    broken_ = true;
  }
  for (auto& c : out_) c->shutdown();
  for (int fd : in_fds_) ::shutdown(fd, SHUT_RDWR);
  cv_.notify_all();
}

void RingLinks::join() {
  // Only joins threads; the SendConn objects live until ~RingLinks so that a
  // late send() from an aborting op never touches freed memory.
  if (connector_.joinable()) connector_.join();
  std::vector<SendConn*> conns;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& c : out_) conns.push_back(c.get());
  }
  for (auto* c : conns) c->join();  // outside mu_: a failing sender takes mu_ to report
}

}  // namespace pyccl::net
