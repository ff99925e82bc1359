// Minimal leveled logger for the data plane.
//
// The level comes from PYCCL_LOG_LEVEL (error|warning|info|debug, default
// warning), read once. Messages go to stderr as one line each, formatted like
// Python's logging output so the two interleave readably. Logging never
// takes the GIL: C++ threads must not depend on Python being responsive.
#pragma once

#include <sstream>
#include <string>

namespace pyccl::log {

enum class Level : int { Debug = 10, Info = 20, Warning = 30, Error = 40, Off = 100 };

Level current_level();
void set_level(Level level);
Level parse_level(const std::string& name);  // unknown names map to Warning
void write(Level level, const std::string& message);

inline bool enabled(Level level) { return static_cast<int>(level) >= static_cast<int>(current_level()); }

}  // namespace pyccl::log

// Usage: PYCCL_LOG(Warning, "rejected frame from " << addr << ": " << why);
#define PYCCL_LOG(LEVEL, EXPR)                                          \
  do {                                                                  \
    if (::pyccl::log::enabled(::pyccl::log::Level::LEVEL)) {            \
      std::ostringstream pyccl_log_os_;                                 \
      pyccl_log_os_ << EXPR;                                            \
      ::pyccl::log::write(::pyccl::log::Level::LEVEL, pyccl_log_os_.str()); \
    }                                                                   \
  } while (0)
