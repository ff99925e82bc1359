// Link shaping of the link emulator: what one emulated path does to bytes.
//
// A path is an ordered pair of peers (source -> destination). Bytes that
// enter it first wait for the source peer's uplink (shared by all of its
// outgoing links), then for the link's rate (shared by all connections of
// that ordered pair, or by every pair given the same shared-rate name: the
// WAN pipe between two regions), then travel for the one-way delay. Both rates are
// virtual clocks (the time the last byte finished serialising), so pacing
// costs a multiply and a lock, never a sleep: the delay line holds the
// bytes until their due time.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

namespace pyccl::linkemu {

// Nanoseconds on CLOCK_MONOTONIC (the clock the workers' timerfds use).
int64_t now_ns();

struct LinkParams {
  int64_t delay_ns = 0;   // one-way propagation delay
  double rate = 0;        // bytes/s shared by the link's connections; 0: unlimited
  uint64_t window = 0;    // bytes in flight per connection and direction; 0: default line size
};

// Serialisation at `rate` bytes/s on a virtual clock shared across threads.
class RateClock {
 public:
  explicit RateClock(double rate) : rate_(rate) {}
  // The time at which `n` bytes offered at `at_ns` have left (>= at_ns).
  int64_t depart(int64_t at_ns, uint64_t n);

 private:
  const double rate_;
  std::mutex mu_;
  int64_t busy_until_ = 0;
};

// Everything a direction of a connection needs to shape its bytes.
struct Path {
  LinkParams link;
  std::shared_ptr<RateClock> uplink;  // may be null
  std::shared_ptr<RateClock> rate;    // may be null
  // Due time of `n` bytes read at `at_ns`.
  int64_t due(int64_t at_ns, uint64_t n) const;
};

// The geography: which source address is which peer, and the parameters of
// every ordered pair. Unknown peers use the default link. Thread-safe.
class Geography {
 public:
  void set_default(const LinkParams& p);
  void set_source(const std::string& ip, const std::string& peer);
  // `shared`: pairs with the same non-empty name share one rate clock.
  void set_link(const std::string& src, const std::string& dst, const LinkParams& p, const std::string& shared = "");
  void set_uplink(const std::string& peer, double rate);
  std::string peer_of(const std::string& ip) const;
  Path path(const std::string& src, const std::string& dst);

 private:
  mutable std::mutex mu_;
  LinkParams default_;
  std::map<std::string, std::string> sources_;
  std::map<std::pair<std::string, std::string>, std::pair<LinkParams, std::string>> links_;
  std::map<std::string, std::shared_ptr<RateClock>> link_clocks_;  // by pair ("src>dst") or shared name
  std::map<std::string, double> uplink_rates_;
  std::map<std::string, std::shared_ptr<RateClock>> uplink_clocks_;
};

}  // namespace pyccl::linkemu
