#include "kernels/hash.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

namespace pyccl {
namespace {

// XXH64 as specified by its author (Y. Collet); constants from the spec.
constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t P3 = 0x165667B19E3779F9ULL;
constexpr uint64_t P4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t P5 = 0x27D4EB2F165667C5ULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t read64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // little-endian host (checked in net/wire_format.h)
}
inline uint32_t read32(const unsigned char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t round_(uint64_t acc, uint64_t input) {
  acc += input * P2;
  acc = rotl(acc, 31);
  return acc * P1;
}
inline uint64_t merge(uint64_t acc, uint64_t val) {
  acc ^= round_(0, val);
  return acc * P1 + P4;
}

}  // namespace

uint64_t xxh64(const void* data, size_t len, uint64_t seed) {
  const auto* p = static_cast<const unsigned char*>(data);
  const unsigned char* const end = p + len;
  uint64_t h;
  if (len >= 32) {
    uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
    const unsigned char* const limit = end - 32;
    do {
      v1 = round_(v1, read64(p));
      v2 = round_(v2, read64(p + 8));
      v3 = round_(v3, read64(p + 16));
      v4 = round_(v4, read64(p + 24));
      p += 32;
    } while (p <= limit);
    h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
    h = merge(h, v1);
    h = merge(h, v2);
    h = merge(h, v3);
    h = merge(h, v4);
  } else {
    h = seed + P5;
  }
  h += static_cast<uint64_t>(len);
  while (p + 8 <= end) {
    h ^= round_(0, read64(p));
    h = rotl(h, 27) * P1 + P4;
    p += 8;
  }
  if (p + 4 <= end) {
    h ^= static_cast<uint64_t>(read32(p)) * P1;
    h = rotl(h, 23) * P2 + P3;
    p += 4;
  }
  while (p < end) {
    h ^= static_cast<uint64_t>(*p) * P5;
    h = rotl(h, 11) * P1;
    ++p;
  }
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

uint64_t combine_block_hashes(const uint64_t* hashes, size_t blocks, size_t total_len) {
  return xxh64(hashes, blocks * sizeof(uint64_t), static_cast<uint64_t>(total_len));
}

uint64_t content_hash(const void* data, size_t len, unsigned max_threads) {
  const auto* p = static_cast<const unsigned char*>(data);
  const size_t blocks = (len + kHashBlockBytes - 1) / kHashBlockBytes;
  std::vector<uint64_t> block_hashes(blocks);
  auto hash_range = [&](size_t first, size_t last) {
    for (size_t b = first; b < last; ++b) {
      const size_t off = b * kHashBlockBytes;
      const size_t n = len - off < kHashBlockBytes ? len - off : kHashBlockBytes;
      block_hashes[b] = block_hash(p + off, n);
    }
  };
  // Big buffers: split the blocks over the cores (memory bandwidth allows
  // more than one core's worth of XXH64).
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  const size_t threads = std::min<size_t>(max_threads ? max_threads : cores, 8);
  if (blocks >= 64 && threads > 1) {
    std::vector<std::thread> pool;
    const size_t per = (blocks + threads - 1) / threads;
    for (size_t t = 1; t < threads; ++t)
      pool.emplace_back(hash_range, std::min(blocks, t * per), std::min(blocks, (t + 1) * per));
    hash_range(0, std::min(blocks, per));
    for (auto& th : pool) th.join();
  } else {
    hash_range(0, blocks);
  }
  return combine_block_hashes(block_hashes.data(), blocks, len);
}

}  // namespace pyccl
