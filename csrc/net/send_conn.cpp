#include "net/send_conn.h"

#include <sys/uio.h>

#include "common/log.h"

namespace pyccl::net {

namespace {
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

SendConn::SendConn(std::unique_ptr<ByteStream> stream, std::string peer_desc, uint64_t epoch, double keepalive_s, BrokenFn on_broken)
    : stream_(std::move(stream)),
      peer_desc_(std::move(peer_desc)),
      epoch_(epoch),
      keepalive_(keepalive_s),
      on_broken_(std::move(on_broken)) {
  last_write_ns_ = now_ns();
  thread_ = std::thread([this] { run(); });
}

SendConn::~SendConn() {
  shutdown();
  join();
}

void SendConn::submit(const std::shared_ptr<FrameSource>& op, const DataHeader& header, const void* payload) {
  op->add_pending_send();
  Job job{op, header, payload};
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (broken_ || stopping_) {
      lock.unlock();
      op->fail(FailKind::Peer, "connection to " + peer_desc_ + " is down");
      op->send_done(false, 0);
      return;
    }
    if (header.length > kInlineBytes || !queue_.empty()) {
      queue_.push_back(std::move(job));
      cv_.notify_one();
      return;
    }
  }
  // Idle connection and a small frame: write it from this thread if nobody
  // else is writing right now and it fits without waiting (see
  // ByteStream::writable_now); otherwise fall back to the queue.
  std::unique_lock<std::mutex> wlock(write_mu_, std::try_to_lock);
  if (wlock.owns_lock() && stream_->writable_now(sizeof(DataHeader) + header.length)) {
    bool ok = write_frame(job);
    job.op->send_done(ok, ok ? job.header.length : 0);
    return;
  }
  if (wlock.owns_lock()) wlock.unlock();
  std::lock_guard<std::mutex> lock(mu_);
  queue_.push_back(std::move(job));
  cv_.notify_one();
}

bool SendConn::write_frame(const Job& job) {
  if (job.op->failed()) return false;  // no point sending for a dead op
  iovec iov[2] = {{const_cast<DataHeader*>(&job.header), sizeof(DataHeader)},
                  {const_cast<void*>(job.payload), job.header.length}};
  try {
    stream_->sendv_all(iov, job.header.length ? 2 : 1);
    last_write_ns_ = now_ns();
    return true;
  } catch (const SocketError& e) {
    job.op->fail(FailKind::Peer, "lost connection to " + peer_desc_ + " (" + e.what() + ")");
    report_failure(e.what());
    return false;
  }
}

void SendConn::report_failure(const std::string& what) {
  bool first = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    first = !broken_ && !stopping_;
    broken_ = true;
  }
  if (first) on_broken_("lost connection to " + peer_desc_ + " (" + what + ")");
}

void SendConn::write_keepalive() {
  std::unique_lock<std::mutex> wlock(write_mu_, std::try_to_lock);
  if (!wlock.owns_lock()) return;  // someone is writing: that is traffic enough
  DataHeader h;
  h.phase = static_cast<uint8_t>(Phase::Keepalive);
  h.epoch = epoch_;
  try {
    stream_->send_all(&h, sizeof(h));
    last_write_ns_ = now_ns();
  } catch (const SocketError& e) {
    report_failure(e.what());
  }
}

void SendConn::run() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Sleep until there is work, or until the link has been idle for a
      // keepalive interval (a timer, not a poll: nothing runs in between).
      const bool woke = cv_.wait_for(lock, keepalive_, [&] { return !queue_.empty() || stopping_; });
      if (!woke) {
        const bool idle = now_ns() - last_write_ns_.load() >=
                          std::chrono::duration_cast<std::chrono::nanoseconds>(keepalive_).count();
        const bool usable = !broken_;
        lock.unlock();
        if (idle && usable) write_keepalive();
        continue;
      }
      if (queue_.empty()) return;  // stopping and drained
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    bool ok = false;
    if (stopping_) {
      job.op->fail(FailKind::Aborted, "the link to " + peer_desc_ + " was closed");
    } else {
      std::lock_guard<std::mutex> wlock(write_mu_);
      ok = write_frame(job);
    }
    job.op->send_done(ok, ok ? job.header.length : 0);
  }
}

void SendConn::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    cv_.notify_all();
  }
  stream_->shutdown_both();
}

void SendConn::join() {
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

}  // namespace pyccl::net
