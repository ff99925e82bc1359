#include "linkemu/pump.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <future>
#include <stdexcept>
#include <string>

namespace pyccl::linkemu {

namespace {
constexpr size_t kBlock = 256 << 10;     // largest read into the line
constexpr uint64_t kLineDelayed = 64 << 20;  // line size without a window, with a delay
constexpr uint64_t kLinePlain = 4 << 20;     // ... and without a delay
constexpr size_t kPoolMax = 512;

void check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string(what) + ": " + std::to_string(errno));
}

void close_fd(int fd, bool rst) {
  if (fd < 0) return;
  if (rst) {
    // SO_LINGER with a zero timeout: close() sends an RST, like a path that resets.
    linger l{1, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  }
  ::close(fd);
}

void init_direction(uint64_t window, bool rate_limited, double rate, int64_t delay, uint64_t& cap, size_t& max_read) {
  cap = window ? window : (delay > 0 ? kLineDelayed : kLinePlain);
  max_read = kBlock;
  // A paced link takes smaller bites so its bytes leave about a millisecond
  // apart rather than in one burst per block.
  if (rate_limited && rate > 0) max_read = std::clamp<size_t>(static_cast<size_t>(rate / 1000), 16 << 10, kBlock);
}
}  // namespace

std::atomic<uint64_t> Worker::next_id_{1};

Worker::Worker() {
  epfd_ = ::epoll_create1(EPOLL_CLOEXEC);
  wakefd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  timerfd_ = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  check(epfd_ >= 0 && wakefd_ >= 0 && timerfd_ >= 0, "epoll/eventfd/timerfd");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &wake_handle_;
  check(::epoll_ctl(epfd_, EPOLL_CTL_ADD, wakefd_, &ev) == 0, "epoll_ctl wake");
  ev.data.ptr = &timer_handle_;
  check(::epoll_ctl(epfd_, EPOLL_CTL_ADD, timerfd_, &ev) == 0, "epoll_ctl timer");
}

Worker::~Worker() {
  stop();
  ::close(epfd_);
  ::close(wakefd_);
  ::close(timerfd_);
}

void Worker::start() { thread_ = std::thread([this] { loop(); }); }

void Worker::stop() {
  if (!thread_.joinable()) return;
  post([this] {
    std::vector<uint64_t> ids;
    for (auto& kv : conns_) ids.push_back(kv.first);
    for (uint64_t id : ids) reset(id);
    graveyard_.clear();
    for (auto& kv : listeners_) ::close(kv.first);
    listeners_.clear();
    stopping_ = true;
  });
  thread_.join();
}

void Worker::post(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(inbox_mu_);
    inbox_.push_back(std::move(task));
  }
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wakefd_, &one, sizeof(one));
}

void Worker::call(const std::function<void()>& task) {
  std::promise<void> done;
  post([&] {
    task();
    done.set_value();
  });
  done.get_future().wait();
}

void Worker::watch_listener(int fd, std::function<void(int)> on_accept) {
  auto h = std::make_unique<Handle>(Handle{Handle::Listener, nullptr, fd});
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = h.get();
  check(::epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) == 0, "epoll_ctl listener");
  listeners_[fd] = {std::move(h), std::move(on_accept)};
}

void Worker::unwatch_listener(int fd) {
  auto it = listeners_.find(fd);
  if (it == listeners_.end()) return;
  ::close(fd);  // also removes it from the epoll set
  listeners_.erase(it);
}

void Worker::adopt(NewConnection nc) {
  auto c = std::make_unique<Connection>();
  c->id = next_id_++;
  c->proxy = nc.proxy;
  c->client = nc.client;
  c->upstream = nc.upstream;
  c->stats = nc.stats;
  Path* paths[2] = {&nc.down, &nc.up};
  for (int i = 0; i < 2; ++i) {
    Direction& d = c->dirs[i];
    d.src = i == 0 ? c->client : c->upstream;
    d.dst = i == 0 ? c->upstream : c->client;
    d.path = *paths[i];
    init_direction(d.path.link.window, d.path.rate || d.path.uplink, d.path.link.rate, d.path.link.delay_ns, d.cap,
                   d.max_read);
    d.counter = i == 0 ? &c->stats->down : &c->stats->up;
    if (d.path.link.delay_ns == 0 && !d.path.rate && !d.path.uplink) {
      int p[2];
      if (::pipe2(p, O_NONBLOCK | O_CLOEXEC) == 0) {
        d.pipe_r = p[0];
        d.pipe_w = p[1];
        // The window bounds what the pipe holds (the kernel rounds to pages).
        const int want = static_cast<int>(std::min<uint64_t>(d.path.link.window ? d.path.link.window : 4 << 20, 4 << 20));
        const int got = ::fcntl(d.pipe_w, F_SETPIPE_SZ, want);
        d.cap = static_cast<uint64_t>(got > 0 ? got : ::fcntl(d.pipe_w, F_GETPIPE_SZ));
      }
    }
  }
  c->hc.conn = c->hu.conn = c.get();
  c->hc.fd = c->client;
  c->hu.fd = c->upstream;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
  ev.data.ptr = &c->hc;
  check(::epoll_ctl(epfd_, EPOLL_CTL_ADD, c->client, &ev) == 0, "epoll_ctl client");
  ev.data.ptr = &c->hu;
  check(::epoll_ctl(epfd_, EPOLL_CTL_ADD, c->upstream, &ev) == 0, "epoll_ctl upstream");
  conns_[c->id] = std::move(c);
}

std::vector<uint64_t> Worker::connections_of(int proxy) const {
  std::vector<uint64_t> ids;
  for (const auto& kv : conns_)
    if (kv.second->proxy == proxy) ids.push_back(kv.first);
  return ids;
}

int Worker::stall(int proxy, int64_t until_ns) {
  int n = 0;
  for (auto& kv : conns_) {
    Connection& c = *kv.second;
    if (c.proxy != proxy) continue;
    c.stalled_until = until_ns;
    ++n;
    // A finite stall ends by itself: wake up then and move what queued meanwhile.
    if (until_ns != INT64_MAX) schedule(until_ns, c.id);
  }
  return n;
}

bool Worker::reset(uint64_t id) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return false;
  teardown(*it->second, true);
  return true;
}

int Worker::reset_all(int proxy) {
  int n = 0;
  for (uint64_t id : connections_of(proxy)) n += reset(id) ? 1 : 0;
  return n;
}

void Worker::loop() {
  epoll_event events[256];
  while (!stopping_) {
    int n = ::epoll_wait(epfd_, events, 256, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    for (int i = 0; i < n; ++i) {
      auto* h = static_cast<Handle*>(events[i].data.ptr);
      switch (h->kind) {
        case Handle::Wake: {
          uint64_t v;
          [[maybe_unused]] ssize_t r = ::read(wakefd_, &v, sizeof(v));
          std::vector<std::function<void()>> tasks;
          {
            std::lock_guard<std::mutex> lock(inbox_mu_);
            tasks.swap(inbox_);
          }
          for (auto& t : tasks) t();
          break;
        }
        case Handle::Timer:
          on_timer();
          break;
        case Handle::Listener: {
          auto it = listeners_.find(h->fd);
          if (it != listeners_.end()) it->second.second(h->fd);
          break;
        }
        case Handle::Conn:
          // A connection torn down earlier in this batch is still allocated
          // (graveyard_) but must not act again.
          if (!h->conn->dead) on_conn_event(*h->conn, h->fd);
          break;
      }
    }
    graveyard_.clear();
  }
}

void Worker::on_conn_event(Connection& c, int fd) {
  if (c.connecting) {
    if (fd != c.upstream) return;
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(c.upstream, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      teardown(c, true);  // nobody behind the proxy: refuse the client like a dead host
      return;
    }
    c.connecting = false;
  }
  pump_both(c);
}

void Worker::pump_both(Connection& c) {
  const int64_t now = now_ns();
  if (!pump(c, 0, now)) return;
  pump(c, 1, now);
}

bool Worker::pump(Connection& c, int which, int64_t now) {
  if (c.connecting || c.stalled_until > now) return true;
  Direction& d = c.dirs[which];
  if (d.pipe_r >= 0) return pump_spliced(c, d);
  for (;;) {
    bool progress = false;
    // Deliver what is due, in order.
    while (!d.line.empty()) {
      Chunk& ch = d.line.front();
      if (ch.due > now) {
        if (d.timer_due != ch.due) {
          d.timer_due = ch.due;
          schedule(ch.due, c.id);
        }
        break;
      }
      if (ch.eof) {
        ::shutdown(d.dst, SHUT_WR);
        d.line.pop_front();
        d.done = true;
        progress = true;
        break;
      }
      ssize_t w = ::send(d.dst, ch.block.get() + ch.off, ch.len - ch.off, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w < 0) {
        if (errno == EAGAIN || errno == EINTR) break;  // EPOLLOUT will bring us back
        teardown(c, true);
        return false;
      }
      ch.off += static_cast<size_t>(w);
      progress = true;
      if (ch.off < ch.len) break;
      d.in_flight -= ch.len;
      d.counter->fetch_add(ch.len, std::memory_order_relaxed);
      release(std::move(ch.block));
      d.line.pop_front();
    }
    // Refill the line while it has room.
    while (!d.read_eof && d.in_flight < d.cap) {
      const size_t want = static_cast<size_t>(std::min<uint64_t>(d.cap - d.in_flight, d.max_read));
      auto b = acquire();
      ssize_t r = ::recv(d.src, b.get(), want, MSG_DONTWAIT);
      if (r < 0) {
        release(std::move(b));
        if (errno == EAGAIN || errno == EINTR) break;
        teardown(c, true);  // an error on either socket resets the path, like a real RST
        return false;
      }
      if (r == 0) {
        release(std::move(b));
        d.read_eof = true;
        d.line.push_back(Chunk{std::max(d.last_due, now + d.path.link.delay_ns), nullptr, 0, 0, true});
        progress = true;
        break;
      }
      const int64_t due = std::max(d.path.due(now, static_cast<uint64_t>(r)), d.last_due);
      d.last_due = due;
      d.line.push_back(Chunk{due, std::move(b), static_cast<size_t>(r), 0, false});
      d.in_flight += static_cast<uint64_t>(r);
      progress = true;
    }
    if (!progress) break;
  }
  if (c.dirs[0].done && c.dirs[1].done) {
    teardown(c, false);
    return false;
  }
  return true;
}

bool Worker::pump_spliced(Connection& c, Direction& d) {
  constexpr unsigned kFlags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK;
  for (;;) {
    bool progress = false;
    while (d.piped > 0) {
      ssize_t n = ::splice(d.pipe_r, nullptr, d.dst, nullptr, d.piped, kFlags);
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) break;
        teardown(c, true);
        return false;
      }
      d.piped -= static_cast<uint64_t>(n);
      d.counter->fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
      progress = true;
    }
    while (!d.read_eof && d.piped < d.cap) {
      ssize_t n = ::splice(d.src, nullptr, d.pipe_w, nullptr, d.cap - d.piped, kFlags);
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) break;
        teardown(c, true);
        return false;
      }
      if (n == 0) {
        d.read_eof = true;
      } else {
        d.piped += static_cast<uint64_t>(n);
      }
      progress = true;
    }
    if (d.read_eof && d.piped == 0 && !d.done) {
      ::shutdown(d.dst, SHUT_WR);
      d.done = true;
    }
    if (!progress) break;
  }
  if (c.dirs[0].done && c.dirs[1].done) {
    teardown(c, false);
    return false;
  }
  return true;
}

void Worker::on_timer() {
  uint64_t expirations;
  [[maybe_unused]] ssize_t r = ::read(timerfd_, &expirations, sizeof(expirations));
  armed_ns_ = -1;
  const int64_t now = now_ns();
  std::vector<uint64_t> due;
  while (!timers_.empty() && timers_.top().first <= now) {
    due.push_back(timers_.top().second);
    timers_.pop();
  }
  for (uint64_t id : due) {
    auto it = conns_.find(id);
    if (it == conns_.end()) continue;
    Connection& c = *it->second;
    for (auto& d : c.dirs) d.timer_due = -1;
    pump_both(c);
  }
  arm_timer();
}

void Worker::schedule(int64_t due_ns, uint64_t id) {
  timers_.push({due_ns, id});
  arm_timer();
}

void Worker::arm_timer() {
  if (timers_.empty()) return;
  const int64_t t = timers_.top().first;
  if (armed_ns_ != -1 && armed_ns_ <= t) return;
  armed_ns_ = t;
  itimerspec spec{};
  spec.it_value.tv_sec = t / 1000000000LL;
  spec.it_value.tv_nsec = t % 1000000000LL;
  if (spec.it_value.tv_sec == 0 && spec.it_value.tv_nsec == 0) spec.it_value.tv_nsec = 1;  // 0 would disarm
  ::timerfd_settime(timerfd_, TFD_TIMER_ABSTIME, &spec, nullptr);
}

void Worker::teardown(Connection& c, bool rst) {
  const uint64_t id = c.id;
  close_fd(c.client, rst);
  close_fd(c.upstream, rst);
  for (auto& d : c.dirs) {
    for (auto& ch : d.line)
      if (ch.block) release(std::move(ch.block));
    if (d.pipe_r >= 0) ::close(d.pipe_r);
    if (d.pipe_w >= 0) ::close(d.pipe_w);
    d.pipe_r = d.pipe_w = -1;
  }
  c.stats->active.fetch_sub(1);
  c.dead = true;
  auto it = conns_.find(id);
  graveyard_.push_back(std::move(it->second));
  conns_.erase(it);
}

std::unique_ptr<char[]> Worker::acquire() {
  if (pool_.empty()) return std::unique_ptr<char[]>(new char[kBlock]);
  auto b = std::move(pool_.back());
  pool_.pop_back();
  return b;
}

void Worker::release(std::unique_ptr<char[]> b) {
  if (b && pool_.size() < kPoolMax) pool_.push_back(std::move(b));
}

}  // namespace pyccl::linkemu
