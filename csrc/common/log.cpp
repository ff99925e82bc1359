#include "common/log.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace pyccl::log {
namespace {

Level level_from_env() {
  const char* env = std::getenv("PYCCL_LOG_LEVEL");
  return env ? parse_level(env) : Level::Warning;
}

std::atomic<int>& level_storage() {
  static std::atomic<int> level{static_cast<int>(level_from_env())};
  return level;
}

const char* level_name(Level level) {
  switch (level) {
    case Level::Debug: return "DEBUG";
    case Level::Info: return "INFO";
    case Level::Warning: return "WARNING";
    case Level::Error: return "ERROR";
    default: return "LOG";
  }
}

}  // namespace

Level current_level() { return static_cast<Level>(level_storage().load(std::memory_order_relaxed)); }

void set_level(Level level) { level_storage().store(static_cast<int>(level), std::memory_order_relaxed); }

Level parse_level(const std::string& name) {
  std::string n = name;
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (n == "debug") return Level::Debug;
  if (n == "info") return Level::Info;
  if (n == "warning" || n == "warn") return Level::Warning;
  if (n == "error") return Level::Error;
  if (n == "off" || n == "none" || n == "critical") return Level::Off;
  return Level::Warning;
}

void write(Level level, const std::string& message) {
  // One fprintf per line keeps lines from different threads whole.
  std::fprintf(stderr, "%s:pyccl.core[%d]:%s\n", level_name(level), static_cast<int>(getpid()), message.c_str());
}

}  // namespace pyccl::log
