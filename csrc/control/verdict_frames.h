// The few control frames the C++ core reads and writes itself, so that an
// op's verdict (the master's `op_ok`) reaches the waiting caller without a
// Python thread (see control_channel.h and docs/architecture.md, "The
// verdict path").
//
// Control frames are `u32 big-endian length | msgpack map` (pyccl/wire.py).
// This codec understands exactly two master frames, `op_ok` and
// `heartbeat`, and writes one peer frame, `done`. Anything it does not
// recognise (another type, an extra field, an unusual encoding) is not an
// error here: the channel hands that frame to Python, which parses and
// validates every frame as before. So the fast path can only ever accept a
// subset of what Python accepts, with the same meaning.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace pyccl::control {

// An op's place in the sequence, as in `done` / `op_ok`.
struct VerdictKey {
  uint64_t epoch = 0;
  uint64_t tag = 0;
  uint64_t seq = 0;
  bool operator==(const VerdictKey&) const = default;
};

struct VerdictKeyHash {
  size_t operator()(const VerdictKey& k) const noexcept {
    uint64_t h = k.epoch * 0x9E3779B97F4A7C15ull;
    h ^= (k.tag + 0x632BE59BD9B4E019ull) + (h << 6) + (h >> 2);
    h ^= (k.seq + 0x85EBCA77C2B2AE63ull) + (h << 6) + (h >> 2);
    return static_cast<size_t>(h);
  }
};

enum class FastFrame {
  Other,      // hand it to Python
  Heartbeat,  // {"type": "heartbeat"}: liveness only
  OpOk,       // {"type": "op_ok", "epoch", "tag", "seq"}: `key` is set
};

// Classify one frame body (the msgpack map, without the length prefix).
FastFrame classify(const uint8_t* body, size_t n, VerdictKey* key);

// The whole `done` frame (length prefix included), encoded as
// msgpack-python encodes Done.to_wire().
std::string encode_done(const VerdictKey& key);

constexpr uint64_t kMaxInt = (uint64_t{1} << 63) - 1;  // pyccl.wire.MAX_INT
constexpr uint64_t kMaxTag = (uint64_t{1} << 31) - 1;  // pyccl.wire.MAX_TAG
constexpr uint32_t kMaxFrameBytes = 1u << 20;          // pyccl.wire.MAX_FRAME_BYTES

}  // namespace pyccl::control
