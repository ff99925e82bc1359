// Link probes: how fast and how far is the path to another peer's data port?
//
// `comm.optimize_topology()` measures the links between members with these.
// A probe connects to the peer's advertised data address (so it crosses the
// same network path, proxies and emulators as the ring would); every
// connection starts with a ProbeRequest (the same size as a LinkHello; with
// the epoch's membership proof in a run with a secret). A first connection
// times `pings` 8-byte echoes (RTT = the smallest). Then `connections`
// connections stream at once; the acceptor counts what arrives after the
// first read for `measure_us` (at least 4 RTTs), answers with a
// ProbeResult (bytes, seconds) at once and discards the rest until the
// sender, having seen the answer, resets the connection. Throughput is
// measured where the bytes land, so neither the start-up of the path nor
// the bytes still queued in socket buffers count, and the probe costs
// about `measure_us` plus an RTT, not the time to drain those buffers.
#pragma once

#include <cstdint>
#include <string>

#include "net/socket.h"

namespace pyccl::net {

inline constexpr uint32_t kProbeMagic = 0x4250524fu;  // "ORPB": a link probe
inline constexpr uint16_t kMaxPings = 64;
inline constexpr uint64_t kMaxProbeBytes = 1ull << 30;

#pragma pack(push, 1)
struct ProbeRequest {
  uint32_t magic = kProbeMagic;
  uint16_t version = 1;
  uint16_t pings = 0;       // > 0: an echo connection (no bulk phase)
  uint64_t epoch = 0;       // names the membership key of the proof
  uint64_t from_peer = 0;
  uint64_t max_bytes = 0;   // the acceptor stops counting (and closes) past this
  uint64_t measure_us = 0;  // bulk: answer this long after the first read
};
struct ProbeResult {
  uint64_t bytes = 0;
  double seconds = 0;  // first to last byte at the acceptor
};
#pragma pack(pop)
static_assert(sizeof(ProbeRequest) == 40, "a probe opens like a LinkHello");

struct ProbeReport {
  double rtt_s = 0;        // smallest echo time
  double bandwidth = 0;    // bytes/s summed over the connections
  uint64_t bytes = 0;      // payload sent
};

struct ProbeOptions {
  std::string host, source_host;  // source_host: bind here first ("": any)
  uint16_t port = 0;
  std::string key;                // the epoch's membership key ("": open run)
  uint64_t epoch = 0, my_id = 0;
  int connections = 1, pings = 5;
  double seconds = 0.25, timeout_s = 10.0;
  uint64_t max_bytes = 64ull << 20;
};

// Initiator: runs one probe; throws SocketError when the path fails.
ProbeReport probe_path(const ProbeOptions& opt);

// Acceptor: serves one probe connection after its opening was accepted.
void serve_probe(Socket& sock, const ProbeRequest& req);

}  // namespace pyccl::net
