// The emulator: proxies (one listening port per destination peer), the
// geography that shapes every ordered pair, and the workers that forward.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "linkemu/control.h"
#include "linkemu/pump.h"
#include "linkemu/shaping.h"

namespace pyccl::linkemu {

class Emulator {
 public:
  Emulator(int threads, uint64_t seed);
  ~Emulator();
  // Carries out one command; returns the reply line ("ok ..."); throws
  // std::runtime_error / std::invalid_argument with the reason on failure.
  std::string execute(const Command& cmd);

 private:
  struct Proxy {
    std::string peer, upstream_host;
    uint16_t upstream_port = 0;
    int listen_fd = -1;
    std::shared_ptr<ProxyStats> stats;
  };

  std::string open(const OpenCmd& c);
  std::string stall(const StallCmd& c);
  std::string reset(const ResetCmd& c);
  std::string refuse(int port);
  std::string close(int port);
  std::string stats();
  void on_accept(int port, int listen_fd);
  Proxy& proxy(int port);

  Geography geo_;
  std::vector<std::unique_ptr<Worker>> workers_;  // workers_[0] also accepts
  std::mutex mu_;                                 // proxies_
  std::map<int, Proxy> proxies_;
  size_t next_worker_ = 0;
  std::mt19937_64 rng_;
};

}  // namespace pyccl::linkemu
