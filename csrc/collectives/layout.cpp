#include "collectives/layout.h"

#include <algorithm>
#include <cstdlib>

namespace pyccl {

uint32_t RingLayout::chunk_bytes_for(uint64_t segment_bytes, size_t elem_size) {
  // ~16 chunks per segment keeps enough frames in flight to stripe over many
  // connections and overlap receive/reduce/send, while 64 KiB..1 MiB keeps
  // per-frame overhead (a syscall and a wake-up) small relative to copying.
  static const uint64_t kMax = [] {
    const char* env = std::getenv("PYCCL_MAX_CHUNK_BYTES");  // tuning knob; every peer must use the same value
    uint64_t v = env ? std::strtoull(env, nullptr, 10) : 0;
    return v >= (64u << 10) && v <= (4u << 20) ? v : uint64_t{1} << 20;
  }();
  constexpr uint64_t kMin = 64u << 10;
  uint64_t c = std::clamp<uint64_t>(segment_bytes / 16, kMin, kMax);
  c -= c % elem_size;
  return static_cast<uint32_t>(std::max<uint64_t>(c, elem_size));
}

RingLayout::RingLayout(size_t count, size_t elem_size, int world_size)
    : world_size_(world_size), elem_size_(elem_size), total_bytes_(static_cast<uint64_t>(count) * elem_size) {
  const size_t n = static_cast<size_t>(world_size);
  const size_t base = count / n, extra = count % n;
  const uint32_t chunk_bytes = chunk_bytes_for(static_cast<uint64_t>(base + (extra ? 1 : 0)) * elem_size, elem_size);
  seg_first_.reserve(n + 1);
  uint64_t offset = 0;
  for (size_t s = 0; s < n; ++s) {
    seg_first_.push_back(static_cast<uint32_t>(chunks_.size()));
    uint64_t seg_bytes = static_cast<uint64_t>(base + (s < extra ? 1 : 0)) * elem_size;
    for (uint64_t done = 0; done < seg_bytes;) {
      uint32_t len = static_cast<uint32_t>(std::min<uint64_t>(chunk_bytes, seg_bytes - done));
      chunks_.push_back(Chunk{offset + done, len, static_cast<uint32_t>(s)});
      done += len;
    }
    offset += seg_bytes;
  }
  seg_first_.push_back(static_cast<uint32_t>(chunks_.size()));
}

}  // namespace pyccl
