// 64-bit content hash of a byte buffer, identical on every machine.
//
// XXH64 (seed 0) of each 1 MiB block, then XXH64 of the little-endian block
// hashes with the total length as seed. Blocks are independent, so a GPU (or
// several CPU threads) can hash them in parallel and get the same value; on
// one CPU core it runs at close to memory speed. Not cryptographic: it
// detects corruption and divergence, not forgery.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pyccl {

inline constexpr size_t kHashBlockBytes = 1u << 20;

uint64_t xxh64(const void* data, size_t len, uint64_t seed);
// Hash of a whole buffer; buffers of many blocks are hashed by a few
// threads (blocks are independent), which gives the same value.
uint64_t content_hash(const void* data, size_t len, unsigned max_threads = 0);  // 0: up to all cores
// The pieces of content_hash, for hashing a buffer while it arrives:
// block_hash of every block (block i covers [i, i+1) * kHashBlockBytes),
// then combine_block_hashes.
inline uint64_t block_hash(const void* block, size_t len) { return xxh64(block, len, 0); }
uint64_t combine_block_hashes(const uint64_t* hashes, size_t blocks, size_t total_len);

}  // namespace pyccl
