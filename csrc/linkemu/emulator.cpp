#include "linkemu/emulator.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <stdexcept>

namespace pyccl::linkemu {

namespace {

template <class... F>
struct Overloaded : F... {
  using F::operator()...;
};
template <class... F>
Overloaded(F...) -> Overloaded<F...>;

sockaddr_in address(const std::string& host, uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &a.sin_addr) != 1)
    throw std::invalid_argument("'" + host + "' is not an IPv4 address");
  return a;
}

void nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

}  // namespace

Emulator::Emulator(int threads, uint64_t seed) : rng_(seed) {
  for (int i = 0; i < std::max(1, threads); ++i) {
    workers_.push_back(std::make_unique<Worker>());
    workers_.back()->start();
  }
}

Emulator::~Emulator() {
  for (auto& w : workers_) w->stop();
}

std::string Emulator::execute(const Command& cmd) {
  return std::visit(
      Overloaded{
          [&](const OpenCmd& c) { return open(c); },
          [&](const SourceCmd& c) {
            geo_.set_source(c.ip, c.peer);
            return std::string("ok");
          },
          [&](const LinkCmd& c) {
            geo_.set_link(c.src, c.dst, c.params, c.shared);
            return std::string("ok");
          },
          [&](const DefaultCmd& c) {
            geo_.set_default(c.params);
            return std::string("ok");
          },
          [&](const UplinkCmd& c) {
            geo_.set_uplink(c.peer, c.rate);
            return std::string("ok");
          },
          [&](const StallCmd& c) { return stall(c); },
          [&](const ResetCmd& c) { return reset(c); },
          [&](const RefuseCmd& c) { return refuse(c.port); },
          [&](const CloseCmd& c) { return close(c.port); },
          [&](const StatsCmd&) { return stats(); },
      },
      cmd);
}

Emulator::Proxy& Emulator::proxy(int port) {
  auto it = proxies_.find(port);
  if (it == proxies_.end()) throw std::invalid_argument("no proxy on port " + std::to_string(port));
  return it->second;
}

std::string Emulator::open(const OpenCmd& c) {
  sockaddr_in upstream = address(c.upstream_host, c.upstream_port);
  (void)upstream;  // validated now, used per connection
  sockaddr_in a = address(c.listen_host, 0);
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || ::listen(fd, 512) != 0) {
    const int err = errno;
    if (fd >= 0) ::close(fd);
    throw std::runtime_error("cannot listen on " + c.listen_host + ": " + std::strerror(err));
  }
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  {
    std::lock_guard<std::mutex> lock(mu_);
    proxies_[port] = Proxy{c.peer, c.upstream_host, c.upstream_port, fd, std::make_shared<ProxyStats>()};
  }
  workers_[0]->call([&] { workers_[0]->watch_listener(fd, [this, port](int lfd) { on_accept(port, lfd); }); });
  return "ok " + std::to_string(port);
}

void Emulator::on_accept(int port, int listen_fd) {
  for (;;) {
    sockaddr_in from{};
    socklen_t len = sizeof(from);
    int client = ::accept4(listen_fd, reinterpret_cast<sockaddr*>(&from), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (client < 0) return;  // EAGAIN: drained (or an error the next event retries)
    Proxy p;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = proxies_.find(port);
      if (it == proxies_.end()) {
        ::close(client);
        return;
      }
      p = it->second;
    }
    char ip[INET_ADDRSTRLEN] = {};
    ::inet_ntop(AF_INET, &from.sin_addr, ip, sizeof(ip));
    const std::string src = geo_.peer_of(ip);
    int up = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    sockaddr_in ua = address(p.upstream_host, p.upstream_port);
    if (up < 0 || (::connect(up, reinterpret_cast<sockaddr*>(&ua), sizeof(ua)) != 0 && errno != EINPROGRESS)) {
      // Nobody behind the proxy: refuse the client like a dead host would.
      if (up >= 0) ::close(up);
      linger l{1, 0};
      ::setsockopt(client, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
      ::close(client);
      continue;
    }
    nodelay(client);
    nodelay(up);
    NewConnection nc;
    nc.proxy = port;
    nc.client = client;
    nc.upstream = up;
    nc.down = geo_.path(src, p.peer);
    nc.up = geo_.path(p.peer, src);
    nc.stats = p.stats;
    p.stats->accepted.fetch_add(1);
    p.stats->active.fetch_add(1);
    Worker& w = *workers_[next_worker_++ % workers_.size()];
    w.post([&w, nc = std::move(nc)]() mutable { w.adopt(std::move(nc)); });
  }
}

std::string Emulator::stall(const StallCmd& c) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    proxy(c.port);
  }
  const int64_t until = c.forever ? INT64_MAX : now_ns() + static_cast<int64_t>(c.seconds * 1e9);
  int n = 0;
  for (auto& w : workers_) w->call([&] { n += w->stall(c.port, until); });
  return "ok " + std::to_string(n);
}

std::string Emulator::reset(const ResetCmd& c) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    proxy(c.port);
  }
  int n = 0;
  if (c.all) {
    for (auto& w : workers_) w->call([&] { n += w->reset_all(c.port); });
    return "ok " + std::to_string(n);
  }
  std::vector<std::pair<Worker*, uint64_t>> live;
  for (auto& w : workers_)
    w->call([&] {
      for (uint64_t id : w->connections_of(c.port)) live.emplace_back(w.get(), id);
    });
  if (!live.empty()) {
    auto [w, id] = live[std::uniform_int_distribution<size_t>(0, live.size() - 1)(rng_)];
    w->call([&, w = w, id = id] { n += w->reset(id) ? 1 : 0; });
  }
  return "ok " + std::to_string(n);
}

std::string Emulator::refuse(int port) {
  int fd;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Proxy& p = proxy(port);
    fd = p.listen_fd;
    p.listen_fd = -1;
  }
  if (fd >= 0) workers_[0]->call([&] { workers_[0]->unwatch_listener(fd); });
  return "ok";
}

std::string Emulator::close(int port) {
  refuse(port);
  for (auto& w : workers_) w->call([&] { w->reset_all(port); });
  std::lock_guard<std::mutex> lock(mu_);
  proxies_.erase(port);
  return "ok";
}

std::string Emulator::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out = "ok";
  for (const auto& [port, p] : proxies_) {
    out += " " + std::to_string(port) + ":" + std::to_string(p.stats->down.load()) + ":" +
           std::to_string(p.stats->up.load()) + ":" + std::to_string(p.stats->active.load()) + ":" +
           std::to_string(p.stats->accepted.load());
  }
  return out;
}

}  // namespace pyccl::linkemu
