// RingLayout: how a tensor is cut into segments and chunks.
#include <cstdint>

#include "collectives/layout.h"
#include "harness.h"

using pyccl::Chunk;
using pyccl::RingLayout;

namespace {

uint64_t segment_bytes(const RingLayout& L, int s) {
  uint64_t b = 0;
  for (uint32_t c = L.first_chunk(s); c < L.first_chunk(s + 1); ++c) b += L.chunk(c).length;
  return b;
}

// Chunks tile the tensor in order, each in its segment, none empty, each a
// whole number of elements and at most one chunk size long.
void check_tiling(const RingLayout& L) {
  uint64_t offset = 0;
  for (int s = 0; s < L.world_size(); ++s) {
    CHECK(L.first_chunk(s) <= L.first_chunk(s + 1));
    for (uint32_t c = L.first_chunk(s); c < L.first_chunk(s + 1); ++c) {
      const Chunk& ch = L.chunk(c);
      CHECK_EQ(ch.offset, offset);
      CHECK_EQ(ch.segment, static_cast<uint32_t>(s));
      CHECK(ch.length > 0);
      CHECK_EQ(ch.length % L.elem_size(), 0u);
      offset += ch.length;
    }
  }
  CHECK_EQ(L.first_chunk(0), 0u);
  CHECK_EQ(static_cast<size_t>(L.first_chunk(L.world_size())), L.num_chunks());
  CHECK_EQ(offset, L.total_bytes());
}

}  // namespace

TEST(zero_elements_give_no_chunks) {
  for (int n = 1; n <= 5; ++n) {
    RingLayout L(0, 4, n);
    CHECK_EQ(L.total_bytes(), 0u);
    CHECK_EQ(L.num_chunks(), 0u);
    for (int s = 0; s <= n; ++s) CHECK_EQ(L.first_chunk(s), 0u);
    check_tiling(L);
  }
}

TEST(fewer_elements_than_segments) {
  RingLayout L(3, 8, 5);  // segments 0..2 get one element, 3 and 4 none
  CHECK_EQ(L.num_chunks(), 3u);
  for (int s = 0; s < 3; ++s) CHECK_EQ(segment_bytes(L, s), 8u);
  CHECK_EQ(segment_bytes(L, 3), 0u);
  CHECK_EQ(segment_bytes(L, 4), 0u);
  check_tiling(L);
}

TEST(remainder_goes_to_first_segments) {
  RingLayout L(10, 2, 4);  // 3, 3, 2, 2 elements
  CHECK_EQ(segment_bytes(L, 0), 6u);
  CHECK_EQ(segment_bytes(L, 1), 6u);
  CHECK_EQ(segment_bytes(L, 2), 4u);
  CHECK_EQ(segment_bytes(L, 3), 4u);
  CHECK_EQ(L.chunk(2).offset, 12u);
  check_tiling(L);
}

TEST(large_segments_are_cut_into_chunks) {
  const size_t count = 4 * 300000 + 3;  // float32, 4 segments of ~1.2 MB
  RingLayout L(count, 4, 4);
  check_tiling(L);
  const uint32_t chunk = RingLayout::chunk_bytes_for(300001 * 4, 4);
  CHECK_EQ(chunk, 300001u * 4 / 16 / 4 * 4);  // about 16 chunks per segment
  for (int s = 0; s < 4; ++s) {
    const uint64_t bytes = segment_bytes(L, s);
    CHECK_EQ(static_cast<uint64_t>(L.first_chunk(s + 1) - L.first_chunk(s)), (bytes + chunk - 1) / chunk);
    for (uint32_t c = L.first_chunk(s); c < L.first_chunk(s + 1); ++c) CHECK(L.chunk(c).length <= chunk);
  }
}

TEST(chunk_size_is_clamped_and_element_aligned) {
  CHECK_EQ(RingLayout::chunk_bytes_for(0, 4), 64u << 10);
  CHECK_EQ(RingLayout::chunk_bytes_for(1000, 8), 64u << 10);
  CHECK_EQ(RingLayout::chunk_bytes_for(4u << 20, 4), 256u << 10);
  CHECK_EQ(RingLayout::chunk_bytes_for(uint64_t{1} << 32, 2), 1u << 20);
  CHECK_EQ(RingLayout::chunk_bytes_for((3u << 20) + 48, 8) % 8, 0u);
}

TEST(single_segment_layout) {
  RingLayout L(100000, 4, 1);  // broadcast: one segment holding every chunk
  check_tiling(L);
  CHECK(L.num_chunks() > 1);
  CHECK_EQ(static_cast<size_t>(L.first_chunk(1)), L.num_chunks());
}

TEST(segment_at_walks_backwards_around_the_ring) {
  RingLayout L(12, 4, 3);
  CHECK_EQ(L.segment_at(0, 0), 0);
  CHECK_EQ(L.segment_at(0, 1), 2);
  CHECK_EQ(L.segment_at(1, 2), 2);
  CHECK_EQ(L.segment_at(2, 5), 0);
}

TEST_MAIN()
