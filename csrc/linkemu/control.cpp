#include "linkemu/control.h"

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace pyccl::linkemu {

namespace {

std::vector<std::string> split(const std::string& line) {
  std::istringstream in(line);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  return words;
}

double number(const std::string& w, const char* what) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(w, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != w.size() || !std::isfinite(v) || v < 0)
    throw std::invalid_argument(std::string(what) + " must be a non-negative number, got '" + w + "'");
  return v;
}

int port(const std::string& w) {
  const double v = number(w, "port");
  if (v < 1 || v > 65535 || v != std::floor(v)) throw std::invalid_argument("port must be in 1..65535, got '" + w + "'");
  return static_cast<int>(v);
}

LinkParams params(const std::vector<std::string>& w, size_t at) {
  LinkParams p;
  p.delay_ns = static_cast<int64_t>(number(w[at], "delay") * 1e9);
  p.rate = number(w[at + 1], "rate");
  p.window = static_cast<uint64_t>(number(w[at + 2], "window"));
  return p;
}

void arity(const std::vector<std::string>& w, size_t lo, size_t hi, const char* usage) {
  if (w.size() < lo || w.size() > hi) throw std::invalid_argument(std::string("usage: ") + usage);
}

}  // namespace

Command parse_command(const std::string& line) {
  const auto w = split(line);
  if (w.empty()) throw std::invalid_argument("empty command");
  const std::string& verb = w[0];
  if (verb == "open") {
    arity(w, 4, 5, "open <peer> <upstream-host> <upstream-port> [<listen-host>]");
    OpenCmd c{w[1], w[2], static_cast<uint16_t>(port(w[3]))};
    if (w.size() == 5) c.listen_host = w[4];
    return c;
  }
  if (verb == "source") {
    arity(w, 3, 3, "source <ip> <peer>");
    return SourceCmd{w[1], w[2]};
  }
  if (verb == "link") {
    arity(w, 6, 7, "link <src> <dst> <delay-s> <rate> <window> [<shared>]");
    return LinkCmd{w[1], w[2], params(w, 3), w.size() == 7 ? w[6] : std::string()};
  }
  if (verb == "default") {
    arity(w, 4, 4, "default <delay-s> <rate> <window>");
    return DefaultCmd{params(w, 1)};
  }
  if (verb == "uplink") {
    arity(w, 3, 3, "uplink <peer> <rate>");
    return UplinkCmd{w[1], number(w[2], "rate")};
  }
  if (verb == "stall") {
    arity(w, 3, 3, "stall <port> <seconds|forever>");
    if (w[2] == "forever") return StallCmd{port(w[1]), 0, true};
    return StallCmd{port(w[1]), number(w[2], "seconds"), false};
  }
  if (verb == "reset") {
    arity(w, 3, 3, "reset <port> <one|all>");
    if (w[2] != "one" && w[2] != "all") throw std::invalid_argument("reset takes 'one' or 'all'");
    return ResetCmd{port(w[1]), w[2] == "all"};
  }
  if (verb == "refuse") {
    arity(w, 2, 2, "refuse <port>");
    return RefuseCmd{port(w[1])};
  }
  if (verb == "close") {
    arity(w, 2, 2, "close <port>");
    return CloseCmd{port(w[1])};
  }
  if (verb == "stats") {
    arity(w, 1, 1, "stats");
    return StatsCmd{};
  }
  throw std::invalid_argument("unknown command '" + verb + "'");
}

}  // namespace pyccl::linkemu
