#include "net/wire_checks.h"

#include <cstdio>

namespace pyccl::net {

std::string link_hello_problem(const LinkHello& hello) {
  if (hello.magic != kLinkMagic || hello.version != kWireVersion) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "magic 0x%x, version %u", static_cast<unsigned>(hello.magic),
                  static_cast<unsigned>(hello.version));
    return buf;
  }
  if (hello.conn_count == 0 || hello.conn_count > kMaxConnections)
    return "pool size " + std::to_string(hello.conn_count) + " is not in [1, " + std::to_string(kMaxConnections) + "]";
  if (hello.conn_index >= hello.conn_count)
    return "slot " + std::to_string(hello.conn_index) + " of a pool of " + std::to_string(hello.conn_count);
  return {};
}

std::string data_header_problem(const DataHeader& h, uint64_t epoch) {
  if (h.magic != kDataMagic || h.version != kWireVersion) return "bad magic/version";
  if (h.epoch != epoch) return "frame for epoch " + std::to_string(h.epoch) + " on a link of epoch " + std::to_string(epoch);
  if (is_keepalive(h)) return {};
  if (h.phase < static_cast<uint8_t>(Phase::ReduceScatter) || h.phase > static_cast<uint8_t>(Phase::Start) ||
      h.phase == static_cast<uint8_t>(Phase::Keepalive))
    return "unknown phase";
  if (h.length > kMaxChunkBytes)
    return "payload of " + std::to_string(h.length) + " bytes exceeds the chunk limit";
  return {};
}

}  // namespace pyccl::net
