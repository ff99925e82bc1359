#include "linkemu/shaping.h"

#include <time.h>

#include <algorithm>

namespace pyccl::linkemu {

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

int64_t RateClock::depart(int64_t at_ns, uint64_t n) {
  const auto cost = static_cast<int64_t>(static_cast<double>(n) * 1e9 / rate_);
  std::lock_guard<std::mutex> lock(mu_);
  // An idle link does not bank credit: serialisation starts now at the earliest.
  busy_until_ = std::max(busy_until_, at_ns) + cost;
  return busy_until_;
}

int64_t Path::due(int64_t at_ns, uint64_t n) const {
  int64_t t = at_ns;
  // Tandem queues: the uplink first, then the link (a bottleneck further on).
  if (uplink) t = uplink->depart(t, n);
  if (rate) t = rate->depart(t, n);
  return t + link.delay_ns;
}

void Geography::set_default(const LinkParams& p) {
  std::lock_guard<std::mutex> lock(mu_);
  default_ = p;
}

void Geography::set_source(const std::string& ip, const std::string& peer) {
  std::lock_guard<std::mutex> lock(mu_);
  sources_[ip] = peer;
}

void Geography::set_link(const std::string& src, const std::string& dst, const LinkParams& p,
                         const std::string& shared) {
  std::lock_guard<std::mutex> lock(mu_);
  links_[{src, dst}] = {p, shared};
  // New connections get a clock at the new rate.
  link_clocks_.erase(shared.empty() ? src + ">" + dst : "=" + shared);
}

void Geography::set_uplink(const std::string& peer, double rate) {
  std::lock_guard<std::mutex> lock(mu_);
  uplink_rates_[peer] = rate;
  uplink_clocks_.erase(peer);
}

std::string Geography::peer_of(const std::string& ip) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sources_.find(ip);
  return it == sources_.end() ? std::string() : it->second;
}

Path Geography::path(const std::string& src, const std::string& dst) {
  std::lock_guard<std::mutex> lock(mu_);
  Path p;
  auto it = links_.find({src, dst});
  p.link = it == links_.end() ? default_ : it->second.first;
  const std::string shared = it == links_.end() ? std::string() : it->second.second;
  if (p.link.rate > 0) {
    // Connections of one ordered pair share one clock (links with an unknown
    // end: per (src, dst) names as given, "" included); named pairs share theirs.
    auto& clock = link_clocks_[shared.empty() ? src + ">" + dst : "=" + shared];
    if (!clock) clock = std::make_shared<RateClock>(p.link.rate);
    p.rate = clock;
  }
  auto up = uplink_rates_.find(src);
  if (!src.empty() && up != uplink_rates_.end() && up->second > 0) {
    auto& clock = uplink_clocks_[src];
    if (!clock) clock = std::make_shared<RateClock>(up->second);
    p.uplink = clock;
  }
  return p;
}

}  // namespace pyccl::linkemu
