#include "net/send_conn.h"

#include <sys/uio.h>

#include "common/log.h"

namespace pyccl::net {

SendConn::SendConn(Socket sock, std::string peer_desc, BrokenFn on_broken)
    : sock_(std::move(sock)), peer_desc_(std::move(peer_desc)), on_broken_(std::move(on_broken)) {
  thread_ = std::thread([this] { run(); });
}

SendConn::~SendConn() {
  shutdown();
  join();
}

void SendConn::submit(const std::shared_ptr<Op>& op, const DataHeader& header, const void* payload) {
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
  // else is writing right now; otherwise fall back to the queue.
  std::unique_lock<std::mutex> wlock(write_mu_, std::try_to_lock);
  if (wlock.owns_lock()) {
    bool ok = write_frame(job);
    job.op->send_done(ok, ok ? job.header.length : 0);
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  queue_.push_back(std::move(job));
  cv_.notify_one();
}

bool SendConn::write_frame(const Job& job) {
  if (job.op->failed()) return false;  // no point sending for a dead op
  iovec iov[2] = {{const_cast<DataHeader*>(&job.header), sizeof(DataHeader)},
                  {const_cast<void*>(job.payload), job.header.length}};
  try {
    sock_.sendv_all(iov, job.header.length ? 2 : 1);
    return true;
  } catch (const SocketError& e) {
    std::string reason = "lost connection to " + peer_desc_ + " (" + e.what() + ")";
    bool first = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      first = !broken_ && !stopping_;
      broken_ = true;
    }
    job.op->fail(FailKind::Peer, reason);
    if (first) on_broken_(reason);
    return false;
  }
}

void SendConn::run() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return !queue_.empty() || stopping_; });
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
  sock_.shutdown_both();
}

void SendConn::join() {
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

}  // namespace pyccl::net
