#include "control/control_channel.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <system_error>

namespace pyccl::control {

namespace {

constexpr size_t kReadChunk = 64 << 10;

std::string errno_text(int err) { return std::strerror(err); }

int poll_ms(std::chrono::nanoseconds left) {
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
  return ms <= 0 ? 0 : ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

}  // namespace

ControlChannel::ControlChannel(int fd, double silence_s, bool preempt)
    : silence_(std::chrono::nanoseconds(static_cast<int64_t>(silence_s * 1e9))), preempt_(preempt) {
  fd_ = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (fd_ < 0) throw std::system_error(errno, std::generic_category(), "dup of the master connection");
  wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) {
    const int err = errno;
    ::close(fd_);
    throw std::system_error(err, std::generic_category(), "eventfd for the master connection");
  }
  rbuf_.resize(kReadChunk);
  last_rx_ = Clock::now();
}

ControlChannel::~ControlChannel() {
  // No thread is inside a method here (Python holds the object during every
  // call), so the descriptors cannot be reused under a blocked poll.
  ::close(fd_);
  ::close(wake_fd_);
}

bool ControlChannel::send(const std::string& frame) {
  std::lock_guard<std::mutex> g(send_mu_);
  if (ended()) return false;
  size_t off = 0;
  while (off < frame.size()) {
    const ssize_t n = ::send(fd_, frame.data() + off, frame.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    const int err = errno;
    if (n < 0 && err == EINTR) continue;
    if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK)) {
      // The master is not reading: wait as long as silence would be tolerated.
      pollfd p{fd_, POLLOUT, 0};
      const int rc = ::poll(&p, 1, poll_ms(silence_));
      if (rc > 0 || (rc < 0 && errno == EINTR)) continue;
      if (rc == 0) {
        end(ChannelEnd::Error, "a send to the master did not finish within the heartbeat timeout");
        return false;
      }
    }
    end(ChannelEnd::Error, "sending to the master failed: " + errno_text(n < 0 ? err : EPIPE));
    return false;
  }
  return true;
}

WaitResult ControlChannel::done_and_wait(const VerdictKey& key, uint64_t gen) {
  send(encode_done(key));  // a failure ended the channel: wait() says so
  return wait(key, gen);
}

WaitResult ControlChannel::wait(const VerdictKey& key, uint64_t gen) {
  std::unique_lock<std::mutex> lk(mu_);
  bool reading = false;
  WaitResult result;
  for (;;) {
    if (decided_.erase(key)) {
      unrecorded_.insert(key);
      result = WaitResult::Decided;
      break;
    }
    if (gen_ != gen) {
      result = WaitResult::Moved;
      break;
    }
    if (end_ != ChannelEnd::None) {
      result = WaitResult::Ended;
      break;
    }
    if (reading) {
      read_once(lk);
      continue;
    }
    if (role_ == Role::None) {
      role_ = Role::Caller;
      reading = true;
      continue;
    }
    if (role_ == Role::Background && preempt_ && !preempt_requested_) {
      preempt_requested_ = true;
      const uint64_t one = 1;
      (void)!::write(wake_fd_, &one, sizeof one);
    }
    ++callers_waiting_;
    callers_cv_.wait(lk);
    --callers_waiting_;
  }
  // Leaving: if nobody reads now (this caller read, or it was the one a
  // released role was handed to), pass the role on, or the socket goes unread.
  if (reading) role_ = Role::None;
  if (role_ == Role::None) release_role(lk);
  return result;
}

uint64_t ControlChannel::generation() {
  std::lock_guard<std::mutex> g(mu_);
  return gen_;
}

void ControlChannel::wake() {
  std::lock_guard<std::mutex> g(mu_);
  ++gen_;
  callers_cv_.notify_all();
  if (role_ == Role::Caller) {  // a caller blocked in poll must look at the generation
    const uint64_t one = 1;
    (void)!::write(wake_fd_, &one, sizeof one);
  }
}

ChannelEnd ControlChannel::next_frame(std::string* body) {
  std::unique_lock<std::mutex> lk(mu_);
  bool reading = false;
  for (;;) {
    if (!queue_.empty()) {
      *body = std::move(queue_.front());
      queue_.pop_front();
      if (reading) release_role(lk);
      return ChannelEnd::None;
    }
    if (end_ != ChannelEnd::None) {
      if (reading) release_role(lk);
      *body = end_reason_;
      return end_;
    }
    if (reading) {
      if (preempt_requested_) {  // a caller waits to read its own verdict
        preempt_requested_ = false;
        release_role(lk);
        reading = false;
        continue;
      }
      read_once(lk);
      continue;
    }
    if (role_ == Role::None && !(preempt_ && callers_waiting_ > 0)) {
      role_ = Role::Background;
      reading = true;
      continue;
    }
    background_cv_.wait(lk);
  }
}

std::vector<VerdictKey> ControlChannel::take_decided() {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<VerdictKey> out(decided_.begin(), decided_.end());
  decided_.clear();
  return out;
}

void ControlChannel::recorded(const VerdictKey& key) {
  std::lock_guard<std::mutex> g(mu_);
  unrecorded_.erase(key);
}

std::vector<VerdictKey> ControlChannel::unrecorded() {
  std::lock_guard<std::mutex> g(mu_);
  return {unrecorded_.begin(), unrecorded_.end()};
}

void ControlChannel::end(ChannelEnd kind, const std::string& why) {
  std::lock_guard<std::mutex> g(mu_);
  end_locked(kind, why);
}

bool ControlChannel::ended() {
  std::lock_guard<std::mutex> g(mu_);
  return end_ != ChannelEnd::None;
}

void ControlChannel::end_locked(ChannelEnd kind, const std::string& why) {
  if (end_ != ChannelEnd::None) return;
  end_ = kind;
  end_reason_ = why;
  callers_cv_.notify_all();
  background_cv_.notify_all();
  const uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof one);  // the reader, wherever it polls
}

void ControlChannel::release_role(std::unique_lock<std::mutex>&) {
  role_ = Role::None;
  // Another waiting caller reads next; with none, the background thread.
  if (callers_waiting_ > 0) callers_cv_.notify_all();
  else background_cv_.notify_all();
}

// One poll and one read by the thread holding the reader's role (a caller
// or the background thread: both poll the socket and the eventfd, which
// says "look at the state": a preemption, a new generation, the end).
// Called and returns with `lk` held; the socket is touched without it.
void ControlChannel::read_once(std::unique_lock<std::mutex>& lk) {
  // Silent means no byte for silence_ while bytes could have come: a reader
  // that resumes after a pause (the control thread busy in Python) first
  // looks at what waits in the socket, so the pause itself never counts.
  const auto left = silence_ - (Clock::now() - last_rx_);
  lk.unlock();
  pollfd fds[2] = {{fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
  const int rc = ::poll(fds, 2, poll_ms(left));
  ChannelEnd err = ChannelEnd::None;
  std::string why;
  std::vector<VerdictKey> oks;
  std::vector<std::string> frames;
  bool got = false;
  if (rc < 0 && errno != EINTR) {
    err = ChannelEnd::Error;
    why = "poll on the master connection failed: " + errno_text(errno);
  } else if (rc > 0) {
    if (fds[1].revents & POLLIN) {
      uint64_t v;
      (void)!::read(wake_fd_, &v, sizeof v);
    }
    if (fds[0].revents) {
      if (rbuf_.size() - rlen_ < kReadChunk / 2) rbuf_.resize(rbuf_.size() + kReadChunk);
      const ssize_t n = ::recv(fd_, rbuf_.data() + rlen_, rbuf_.size() - rlen_, MSG_DONTWAIT);
      if (n > 0) {
        rlen_ += static_cast<size_t>(n);
        got = true;
        parse_frames(&oks, &frames, &why);
        if (!why.empty()) err = ChannelEnd::Invalid;
      } else if (n == 0) {
        err = ChannelEnd::Closed;
        why = "connection closed by the other side";
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        err = ChannelEnd::Error;
        why = errno_text(errno);
      }
    }
  }
  lk.lock();
  if (got) last_rx_ = Clock::now();
  else if (rc == 0 && Clock::now() - last_rx_ >= silence_) err = ChannelEnd::Silent, why = "silent";
  for (const VerdictKey& k : oks) decided_.insert(k);
  if (!oks.empty()) callers_cv_.notify_all();
  for (std::string& f : frames) queue_.push_back(std::move(f));
  if (!frames.empty()) background_cv_.notify_all();
  if (err != ChannelEnd::None) end_locked(err, why);
}

// Split the complete frames off the front of rbuf_. Returns how many; sets
// *invalid to the reason if a length is out of bounds (the stream is then
// unusable, as pyccl.wire.decode_length would say).
size_t ControlChannel::parse_frames(std::vector<VerdictKey>* oks, std::vector<std::string>* frames,
                                    std::string* invalid) {
  size_t pos = 0, count = 0;
  while (rlen_ - pos >= 4) {
    const uint8_t* h = rbuf_.data() + pos;
    const uint32_t n = (uint32_t{h[0]} << 24) | (uint32_t{h[1]} << 16) | (uint32_t{h[2]} << 8) | h[3];
    if (n == 0 || n > kMaxFrameBytes) {
      *invalid = n == 0 ? "empty frame"
                        : "frame length " + std::to_string(n) + " exceeds the " + std::to_string(kMaxFrameBytes) +
                              "-byte limit";
      return count;
    }
    if (rlen_ - pos - 4 < n) {
      if (rbuf_.size() < size_t{n} + 4) rbuf_.resize(size_t{n} + 4 + kReadChunk);
      break;
    }
    const uint8_t* body = h + 4;
    VerdictKey key;
    switch (classify(body, n, &key)) {
      case FastFrame::Heartbeat: break;
      case FastFrame::OpOk: oks->push_back(key); break;
      case FastFrame::Other: frames->emplace_back(reinterpret_cast<const char*>(body), n); break;
    }
    pos += 4 + n;
    ++count;
  }
  if (pos > 0) {
    std::memmove(rbuf_.data(), rbuf_.data() + pos, rlen_ - pos);
    rlen_ -= pos;
  }
  return count;
}

}  // namespace pyccl::control
