#include "state/state_server.h"

#include <chrono>
#include <cstdlib>
#include <thread>

#include "common/log.h"

namespace pyccl::state {

void StateServer::publish(std::vector<PublishedKey> keys) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return active_ == 0; });
  keys_ = std::move(keys);
  served_ = 0;
}

uint64_t StateServer::unpublish() {
  std::unique_lock<std::mutex> lock(mu_);
  keys_.clear();  // no new request starts...
  cv_.wait(lock, [&] { return active_ == 0; });  // ...and running ones finish
  return served_;
}

ReplyStatus StateServer::begin(const StateRequest& req, const char** data) {
  std::lock_guard<std::mutex> lock(mu_);
  if (req.key_index >= keys_.size() || keys_[req.key_index].hash != req.expected_hash) return ReplyStatus::NotAvailable;
  const PublishedKey& k = keys_[req.key_index];
  if (req.length > kMaxPieceBytes || req.offset > k.nbytes || req.length > k.nbytes - req.offset)
    return ReplyStatus::OutOfRange;
  *data = static_cast<const char*>(k.data) + req.offset;
  ++active_;
  return ReplyStatus::Ok;
}

void StateServer::end(uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  --active_;
  served_ += bytes;
  cv_.notify_all();
}

namespace {
// Test-only brake: PYCCL_TEST_SERVE_DELAY_MS slows every piece served, so a
// test can kill a holder in the middle of a transfer deterministically.
int serve_delay_ms() {
  static const int ms = [] {
    const char* env = std::getenv("PYCCL_TEST_SERVE_DELAY_MS");
    return env ? std::atoi(env) : 0;
  }();
  return ms;
}
}  // namespace

void StateServer::serve(net::Socket& sock, const StateRequest& first) {
  const std::string addr = sock.peer_name();
  // A fetcher that stops reading must not pin our buffers forever.
  sock.set_send_timeout(10.0);
  sock.set_recv_timeout(60.0);
  StateRequest req = first;
  for (;;) {
    if (req.magic != kRequestMagic) {
      PYCCL_LOG(Warning, "rejected state request from " << addr << ": bad magic; closing");
      return;
    }
    const char* data = nullptr;
    ReplyStatus st = begin(req, &data);
    StateReply reply;
    reply.status = static_cast<uint32_t>(st);
    reply.length = st == ReplyStatus::Ok ? req.length : 0;
    if (st != ReplyStatus::Ok) {
      PYCCL_LOG(Info, "state request from " << addr << " for key " << req.key_index << " ["
                                            << req.offset << ", +" << req.length << ") refused ("
                                            << (st == ReplyStatus::NotAvailable ? "not published with that hash" : "out of range")
                                            << ")");
      try {
        sock.send_all(&reply, sizeof(reply));
      } catch (const net::SocketError&) {
      }
      return;
    }
    if (serve_delay_ms() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(serve_delay_ms()));
    bool ok = true;
    try {
      iovec iov[2] = {{&reply, sizeof(reply)}, {const_cast<char*>(data), req.length}};
      sock.sendv_all(iov, req.length ? 2 : 1);
    } catch (const net::SocketError& e) {
      ok = false;
      PYCCL_LOG(Info, "state transfer to " << addr << " ended: " << e.what());
    }
    end(ok ? req.length : 0);
    if (!ok) return;
    try {
      sock.recv_exact(&req, sizeof(req));
    } catch (const net::SocketError&) {
      return;  // the fetcher is done (or gone)
    }
  }
}

}  // namespace pyccl::state
