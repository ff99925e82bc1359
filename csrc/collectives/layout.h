// How a ring collective cuts a tensor into segments and chunks.
//
// A tensor of `count` elements is split into world_size contiguous segments
// (the first count % n segments get one extra element); segment s is the one
// that ring position s-1 ends up owning after reduce-scatter. Each segment is
// cut into chunks, the unit of pipelining, striping over connections and
// arrival tracking. Sender and receiver derive the same layout from (total
// bytes, element size, world size) alone, so the pool size K may differ
// between peers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pyccl {

struct Chunk {
  uint64_t offset;   // bytes from the start of the tensor
  uint32_t length;   // bytes
  uint32_t segment;  // which segment it belongs to
};

class RingLayout {
 public:
  RingLayout(size_t count, size_t elem_size, int world_size);

  int world_size() const { return world_size_; }
  size_t elem_size() const { return elem_size_; }
  uint64_t total_bytes() const { return total_bytes_; }
  size_t num_chunks() const { return chunks_.size(); }
  const Chunk& chunk(size_t i) const { return chunks_[i]; }
  // Chunks of segment s are [first_chunk(s), first_chunk(s + 1)).
  uint32_t first_chunk(int segment) const { return seg_first_[static_cast<size_t>(segment)]; }

  // Segment index reduced into / received at a given ring step.
  int segment_at(int rank, int step) const { return ((rank - step) % world_size_ + world_size_) % world_size_; }

  static uint32_t chunk_bytes_for(uint64_t segment_bytes, size_t elem_size);

 private:
  int world_size_;
  size_t elem_size_;
  uint64_t total_bytes_;
  std::vector<Chunk> chunks_;
  std::vector<uint32_t> seg_first_;
};

}  // namespace pyccl
