// The emulator's control language: one command per line on stdin, one reply
// per line on stdout ("ok ..." or "error <why>"). The Python side
// (pyccl/stress/linkemu.py) is the only writer; commands are parsed into
// typed structs here, so the executor never looks at text.
//
//   open <peer> <upstream-host> <upstream-port> [<listen-host>]  -> ok <port>
//   source <ip> <peer>          connections from <ip> come from <peer>
//   link <src> <dst> <delay-s> <rate-B/s> <window-bytes> [<shared>]   (0: unlimited / default;
//                               pairs naming the same <shared> share one rate: a region-to-region pipe)
//   default <delay-s> <rate-B/s> <window-bytes>             links with an unknown end
//   uplink <peer> <rate-B/s>    shared by all of <peer>'s outgoing links
//   stall <port> <seconds|forever>                           -> ok <connections>
//   reset <port> <one|all>                                   -> ok <connections>
//   refuse <port>               stop accepting (the peer behind it is gone)
//   close <port>                reset everything and forget the proxy
//   stats                       -> ok <port>:<down>:<up>:<active>:<accepted> ...
#pragma once

#include <cstdint>
#include <string>
#include <variant>

#include "linkemu/shaping.h"

namespace pyccl::linkemu {

struct OpenCmd {
  std::string peer, upstream_host;
  uint16_t upstream_port = 0;
  std::string listen_host = "127.0.0.1";
};
struct SourceCmd {
  std::string ip, peer;
};
struct LinkCmd {
  std::string src, dst;
  LinkParams params;
  std::string shared;
};
struct DefaultCmd {
  LinkParams params;
};
struct UplinkCmd {
  std::string peer;
  double rate = 0;
};
struct StallCmd {
  int port = 0;
  double seconds = 0;
  bool forever = false;
};
struct ResetCmd {
  int port = 0;
  bool all = false;
};
struct RefuseCmd {
  int port = 0;
};
struct CloseCmd {
  int port = 0;
};
struct StatsCmd {};

using Command = std::variant<OpenCmd, SourceCmd, LinkCmd, DefaultCmd, UplinkCmd, StallCmd, ResetCmd, RefuseCmd,
                             CloseCmd, StatsCmd>;

// Parses one line; throws std::invalid_argument that names the problem.
Command parse_command(const std::string& line);

}  // namespace pyccl::linkemu
