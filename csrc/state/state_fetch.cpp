#include "state/state_fetch.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include <algorithm>
#include <cstdio>

#include "common/log.h"
#include "kernels/hash.h"
#include "net/membership_proof.h"
#include "net/socket.h"
#include "state/state_wire.h"

namespace pyccl::state {
namespace {

struct Piece {
  size_t target;  // index into targets
  uint64_t offset;
  uint64_t length;
};

// Work shared by all workers: pieces not yet fetched, and who is still able
// to fetch. A worker that fails returns its piece and leaves.
class Work {
 public:
  Work(std::deque<Piece> pieces, int workers) : queue_(std::move(pieces)), remaining_(queue_.size()), alive_(workers) {}

  // Next piece, waiting while others still hold pieces that might come back.
  bool take(Piece* out) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !queue_.empty() || remaining_ == 0; });
    if (queue_.empty()) return false;
    *out = queue_.front();
    queue_.pop_front();
    return true;
  }
  void done(uint64_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    --remaining_;
    rx_ += bytes;
    cv_.notify_all();
  }
  void give_back(const Piece& p) {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_front(p);
    cv_.notify_all();
  }
  void leave(const std::string& error) {
    std::lock_guard<std::mutex> lock(mu_);
    --alive_;
    if (!error.empty()) last_error_ = error;
    cv_.notify_all();
  }
  // Blocks until all pieces arrived or no worker is left.
  bool wait_finished() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return remaining_ == 0 || alive_ == 0; });
    if (remaining_ != 0) {
      // Nobody will take the queue's pieces: release workers parked in take().
      queue_.clear();
      remaining_ = 0;
      cv_.notify_all();
      return false;
    }
    return true;
  }
  uint64_t rx() {
    std::lock_guard<std::mutex> lock(mu_);
    return rx_;
  }
  std::string last_error() {
    std::lock_guard<std::mutex> lock(mu_);
    return last_error_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Piece> queue_;
  size_t remaining_;
  int alive_;
  uint64_t rx_ = 0;
  std::string last_error_;
};

void worker(const Holder& h, const std::vector<FetchTarget>& targets, const FetchOptions& opt, Work& work) {
  const std::string who = "holder peer " + std::to_string(h.peer_id) + " (" + h.host + ":" + std::to_string(h.port) + ")";
  net::Socket sock;
  bool proven = false;
  Piece p;
  while (work.take(&p)) {
    if (!sock.valid()) {  // connect only once there is work for this worker
      proven = false;
      try {
        sock = net::connect_tcp(h.host, h.port, opt.io_timeout_s);
        sock.set_recv_timeout(opt.io_timeout_s);
        sock.set_send_timeout(opt.io_timeout_s);
      } catch (const net::SocketError& e) {
        work.give_back(p);
        work.leave(who + ": " + e.what());
        return;
      }
    }
    const FetchTarget& t = targets[p.target];
    StateRequest req;
    req.key_index = t.key_index;
    req.expected_hash = t.hash;
    req.offset = p.offset;
    req.length = p.length;
    req.reserved = opt.epoch;  // the epoch whose key proves this connection (first request only)
    try {
      if (!opt.key.empty() && !proven) {
        net::send_opening(sock, opt.key, &req, sizeof(req));
        proven = true;
      } else {
        sock.send_all(&req, sizeof(req));
      }
      StateReply reply;
      sock.recv_exact(&reply, sizeof(reply));
      if (reply.magic != kReplyMagic) throw net::SocketError("malformed reply");
      if (reply.status != static_cast<uint32_t>(ReplyStatus::Ok))
        throw net::SocketError(reply.status == static_cast<uint32_t>(ReplyStatus::NotAvailable)
                                   ? "it no longer holds that content"
                                   : "it refused the byte range");
      if (reply.length != p.length) throw net::SocketError("reply length does not match the request");
      sock.recv_exact(static_cast<char*>(t.dst) + p.offset, p.length);
    } catch (const net::SocketError& e) {
      PYCCL_LOG(Info, "state fetch from " << who << " failed: " << e.what() << "; other holders take over");
      work.give_back(p);
      work.leave(who + ": " + e.what());
      return;
    }
    // Hash the piece's blocks now, while they are hot in cache and spread
    // over the workers; pieces are whole blocks (see fetch_state).
    for (uint64_t off = p.offset; off < p.offset + p.length; off += kHashBlockBytes) {
      const uint64_t len = std::min<uint64_t>(kHashBlockBytes, t.nbytes - off);
      (*t.block_hashes)[off / kHashBlockBytes] = block_hash(static_cast<const char*>(t.dst) + off, len);
    }
    work.done(p.length);
  }
  work.leave("");
}

}  // namespace

Status fetch_state(const std::vector<Holder>& holders, const std::vector<FetchTarget>& targets,
                   const FetchOptions& options, uint64_t* rx_bytes, int64_t* bad_key) {
  *rx_bytes = 0;
  std::deque<Piece> pieces;
  // Whole hash blocks per piece, so that fetchers can hash as bytes arrive.
  uint64_t piece = std::min<uint64_t>(std::max<uint64_t>(options.piece_bytes, kHashBlockBytes), kMaxPieceBytes);
  piece -= piece % kHashBlockBytes;
  std::vector<std::vector<uint64_t>> block_hashes(targets.size());
  std::vector<FetchTarget> hashed = targets;
  for (size_t i = 0; i < targets.size(); ++i) {
    block_hashes[i].assign((targets[i].nbytes + kHashBlockBytes - 1) / kHashBlockBytes, 0);
    hashed[i].block_hashes = &block_hashes[i];
  }
  for (size_t i = 0; i < targets.size(); ++i)
    for (uint64_t off = 0; off < targets[i].nbytes; off += piece)
      pieces.push_back(Piece{i, off, std::min(piece, targets[i].nbytes - off)});
  if (pieces.empty()) return Status::Ok();
  if (holders.empty()) return Status::Fail(FailKind::Peer, "no peer holds the group's state");
  const int per_holder = std::max(1, options.connections_per_holder);
  Work work(std::move(pieces), static_cast<int>(holders.size()) * per_holder);
  std::vector<std::thread> threads;
  // Interleave holders so that each one serves from the start.
  for (int c = 0; c < per_holder; ++c)
    for (const Holder& h : holders) threads.emplace_back([&, hp = &h] { worker(*hp, hashed, options, work); });
  const bool complete = work.wait_finished();
  for (auto& t : threads) t.join();
  *rx_bytes = work.rx();
  if (!complete)
    return Status::Fail(FailKind::Peer, "every holder of the group's state failed during the transfer (last: " +
                                            work.last_error() + ")");
  // Verify every key against the popular copy's hash before reporting success.
  for (size_t i = 0; i < targets.size(); ++i) {
    const uint64_t got = combine_block_hashes(block_hashes[i].data(), block_hashes[i].size(), targets[i].nbytes);
    if (got != targets[i].hash) {
      char buf[128];
      std::snprintf(buf, sizeof(buf), "arrived with hash %016llx, expected %016llx",
                    static_cast<unsigned long long>(got), static_cast<unsigned long long>(targets[i].hash));
      if (bad_key) *bad_key = targets[i].key_index;
      return Status::Fail(FailKind::Protocol, buf);
    }
  }
  return Status::Ok();
}

}  // namespace pyccl::state
