#include "net/probe.h"

#include <errno.h>
#include <poll.h>
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

Socket open_probe(const ProbeOptions& opt, uint16_t pings, uint64_t measure_us) {
  Socket s = connect_tcp(opt.host, opt.port, opt.timeout_s, opt.source_host);
  s.set_recv_timeout(opt.timeout_s);
  ProbeRequest req;
  req.pings = pings;
  req.epoch = opt.epoch;
  req.from_peer = opt.my_id;
  req.max_bytes = opt.max_bytes;
  req.measure_us = measure_us;
  if (opt.key.empty())
    s.send_all(&req, sizeof(req));
  else
    send_opening(s, opt.key, &req, sizeof(req));
  return s;
}

void reset_close(Socket& s) {
  // An RST drops what is still queued (here and in any proxy on the path),
  // so the next probe does not share the path with this one's leftovers.
  linger l{1, 0};
  ::setsockopt(s.fd(), SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  s.close();
}

bool readable(const Socket& s) {
  pollfd p{s.fd(), POLLIN, 0};
  return ::poll(&p, 1, 0) > 0;
}

}  // namespace

ProbeReport probe_path(const ProbeOptions& opt) {
  const int k = std::clamp(opt.connections, 1, 64);
  const uint16_t pings = static_cast<uint16_t>(std::clamp(opt.pings, 1, static_cast<int>(kMaxPings)));
  ProbeReport report;
  report.rtt_s = 1e9;
  {
    Socket echo = open_probe(opt, pings, 0);
    for (uint16_t i = 0; i < pings; ++i) {
      uint64_t token = i, back = 0;
      const auto t0 = Clock::now();
      echo.send_all(&token, sizeof(token));
      echo.recv_exact(&back, sizeof(back));
      if (back != token) throw SocketError("probe: the echo did not match");
      report.rtt_s = std::min(report.rtt_s, since(t0));
    }
  }
  // Long enough that a window's worth in flight is a small part of it.
  const double measure_s = std::max(opt.seconds, 4 * report.rtt_s);
  const auto measure_us = static_cast<uint64_t>(measure_s * 1e6);
  const uint64_t per_conn = std::max<uint64_t>(opt.max_bytes / static_cast<uint64_t>(k), kBlock);
  std::vector<Socket> socks;
  for (int i = 0; i < k; ++i) socks.push_back(open_probe(opt, 0, measure_us));
  std::vector<ProbeResult> results(static_cast<size_t>(k));
  std::vector<uint64_t> sent(static_cast<size_t>(k), 0);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(k));
  std::vector<std::thread> threads;
  for (int i = 0; i < k; ++i) {
    threads.emplace_back([&, i] {
      const auto n = static_cast<size_t>(i);
      try {
        auto block = std::make_unique<char[]>(kBlock);
        std::fill(block.get(), block.get() + kBlock, 0);
        Socket& s = socks[n];
        // Stream until the acceptor answers (it measured long enough) or the
        // byte budget is spent (then half-close: it answers at the EOF).
        while (!readable(s) && sent[n] + kBlock <= per_conn) {
          s.send_all(block.get(), kBlock);
          sent[n] += kBlock;
        }
        if (!readable(s)) ::shutdown(s.fd(), SHUT_WR);
        s.recv_exact(&results[n], sizeof(ProbeResult));
        reset_close(s);
      } catch (...) {
        errors[n] = std::current_exception();
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
  if (req.pings > 0) {
    for (uint16_t i = 0; i < std::min(req.pings, kMaxPings); ++i) {
      uint64_t token;
      sock.recv_exact(&token, sizeof(token));
      sock.send_all(&token, sizeof(token));
    }
    return;
  }
  auto buf = std::make_unique<char[]>(kBlock);
  ProbeResult result;
  Clock::time_point first{}, last{};
  bool started = false, answered = false;
  const auto window = std::chrono::microseconds(std::min<uint64_t>(req.measure_us, 60'000'000));
  uint64_t total = 0;
  const uint64_t limit = std::min(req.max_bytes, kMaxProbeBytes);
  auto answer = [&] {
    result.seconds = std::chrono::duration<double>(last - first).count();
    sock.send_all(&result, sizeof(result));
    answered = true;
  };
  for (;;) {
    ssize_t n = ::recv(sock.fd(), buf.get(), kBlock, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // EOF: the budget was spent; or the sender reset after our answer
    total += static_cast<uint64_t>(n);
    if (total > limit + kBlock) throw SocketError("probe: more bytes than announced");
    if (answered) continue;  // what was queued before the sender stopped: discarded
    const auto now = Clock::now();
    // The first read's bytes arrived before the clock could start: the rate
    // counts what arrived after it.
    if (!started) {
      started = true;
      first = now;
    } else {
      result.bytes += static_cast<uint64_t>(n);
    }
    last = now;
    if (now - first >= window) answer();
  }
  if (!answered) answer();
}

}  // namespace pyccl::net
