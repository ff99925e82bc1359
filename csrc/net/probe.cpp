#include "net/probe.h"

#include <errno.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

#include "net/membership_proof.h"

namespace pyccl::net {

namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kBlock = 256 << 10;

double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

Socket open_probe(const ProbeOptions& opt, uint16_t pings) {
  Socket s = connect_tcp(opt.host, opt.port, opt.timeout_s, opt.source_host);
  s.set_recv_timeout(opt.timeout_s);
  ProbeRequest req;
  req.pings = pings;
  req.epoch = opt.epoch;
  req.from_peer = opt.my_id;
  req.max_bytes = opt.max_bytes;
  if (opt.key.empty())
    s.send_all(&req, sizeof(req));
  else
    send_opening(s, opt.key, &req, sizeof(req));
  return s;
}

}  // namespace

ProbeReport probe_path(const ProbeOptions& opt) {
  const int k = std::clamp(opt.connections, 1, 64);
  const uint16_t pings = static_cast<uint16_t>(std::clamp(opt.pings, 1, static_cast<int>(kMaxPings)));
  std::vector<Socket> socks;
  for (int i = 0; i < k; ++i) socks.push_back(open_probe(opt, i == 0 ? pings : 0));
  ProbeReport report;
  report.rtt_s = 1e9;
  for (uint16_t i = 0; i < pings; ++i) {
    uint64_t token = i, echo = 0;
    const auto t0 = Clock::now();
    socks[0].send_all(&token, sizeof(token));
    socks[0].recv_exact(&echo, sizeof(echo));
    if (echo != token) throw SocketError("probe: the echo did not match");
    report.rtt_s = std::min(report.rtt_s, since(t0));
  }
  // Stream for long enough that the path's start-up is a small part of it:
  // at least `seconds`, and at least 4 round trips.
  const double stream_s = std::max(opt.seconds, 4 * report.rtt_s);
  const uint64_t per_conn = std::max<uint64_t>(opt.max_bytes / static_cast<uint64_t>(k), kBlock);
  std::vector<ProbeResult> results(static_cast<size_t>(k));
  std::vector<uint64_t> sent(static_cast<size_t>(k), 0);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(k));
  std::vector<std::thread> threads;
  const auto start = Clock::now();
  for (int i = 0; i < k; ++i) {
    threads.emplace_back([&, i] {
      try {
        auto block = std::make_unique<char[]>(kBlock);
        std::fill(block.get(), block.get() + kBlock, 0);
        Socket& s = socks[static_cast<size_t>(i)];
        uint64_t& n = sent[static_cast<size_t>(i)];
        while (since(start) < stream_s && n + kBlock <= per_conn) {
          s.send_all(block.get(), kBlock);
          n += kBlock;
        }
        ::shutdown(s.fd(), SHUT_WR);
        s.recv_exact(&results[static_cast<size_t>(i)], sizeof(ProbeResult));
      } catch (...) {
        errors[static_cast<size_t>(i)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  for (int i = 0; i < k; ++i) {
    const ProbeResult& r = results[static_cast<size_t>(i)];
    report.bytes += sent[static_cast<size_t>(i)];
    if (r.seconds > 0) report.bandwidth += static_cast<double>(r.bytes) / r.seconds;
  }
  return report;
}

void serve_probe(Socket& sock, const ProbeRequest& req) {
  for (uint16_t i = 0; i < std::min(req.pings, kMaxPings); ++i) {
    uint64_t token;
    sock.recv_exact(&token, sizeof(token));
    sock.send_all(&token, sizeof(token));
  }
  auto buf = std::make_unique<char[]>(kBlock);
  ProbeResult result;
  Clock::time_point first{}, last{};
  bool started = false;
  uint64_t total = 0;
  const uint64_t limit = std::min(req.max_bytes, kMaxProbeBytes);
  for (;;) {
    ssize_t n = ::recv(sock.fd(), buf.get(), kBlock, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw SocketError("probe: receive failed");
    if (n == 0) break;
    const auto now = Clock::now();
    // The first read's bytes arrived before the clock could start: the
    // rate counts what arrived after it.
    if (!started) {
      started = true;
      first = now;
    } else {
      result.bytes += static_cast<uint64_t>(n);
    }
    last = now;
    total += static_cast<uint64_t>(n);
    if (total > limit + kBlock) throw SocketError("probe: more bytes than announced");
  }
  result.seconds = std::chrono::duration<double>(last - first).count();
  sock.send_all(&result, sizeof(result));
}

}  // namespace pyccl::net
