// Validation of the fixed-size frames a data port reads from the network,
// before any field is acted on. Pure functions (no sockets), shared by the
// data plane and the fuzz harnesses in tests/fuzz/.
#pragma once

#include <cstdint>
#include <string>

#include "net/wire_format.h"

namespace pyccl::net {

// Why a LinkHello cannot open a ring link, or "" if its fields are sane
// (whether its epoch is current and its proof holds is checked by the caller).
std::string link_hello_problem(const LinkHello& hello);

// Why a data frame read on a link of `epoch` must close the link, or "".
// A keepalive (phase Keepalive, no payload) is fine and carries nothing.
std::string data_header_problem(const DataHeader& h, uint64_t epoch);

inline bool is_keepalive(const DataHeader& h) {
  return h.phase == static_cast<uint8_t>(Phase::Keepalive) && h.length == 0;
}

}  // namespace pyccl::net
