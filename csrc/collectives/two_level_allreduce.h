// Two-level all-reduce across regions.
//
// The members of an epoch are grouped into R regions of m peers each (equal
// sizes; the Python side decides when that holds). Three ring collectives,
// each over its own ring of the epoch:
//
//   1. reduce-scatter inside the region (region ring, m peers): region rank
//      r ends with segment r of the region's partial result, in `work`;
//   2. all-reduce of segment r across regions (cross ring: the R peers of
//      region rank r, one per region), into a shard-sized scratch buffer;
//   3. all-gather inside the region (region ring), from the scratch buffer
//      back into `work`.
//
// So the slow links between regions carry 1/m of the data each, m of them
// in parallel. Every step is an ordinary ring op with the usual guarantees:
// the input is only read, owners finish each chunk and forward it verbatim
// (every peer ends with the same bytes: a fixed summation order, regions
// in cross-ring order), and any failure fails the op. AVG divides at both
// owners (by m, then by R): with equal regions that is the mean, the same
// bits on every peer. Step 1 runs under the op's own key, so a peer that
// ran the same call as a flat ring meets a mismatch instead of waiting;
// steps 2 and 3 use keys of their own (tag | kTwoLevelTagBit, 2 seq + k).
#pragma once

#include <cstdint>
#include <functional>

#include "collectives/op.h"
#include "common/status.h"

namespace pyccl {

inline constexpr uint32_t kTwoLevelTagBit = 0x80000000u;  // user tags are < 2^31

enum class SubRing { Region = 1, Cross = 2 };

struct TwoLevelGeometry {
  int region_rank = 0, region_size = 1;  // in the region ring
  int cross_rank = 0, cross_size = 1;    // in the cross ring (one peer per region)
};

struct SubOpResult {
  Status status;
  uint64_t tx_bytes = 0, rx_bytes = 0;
};

// Runs one ring op over the given ring (the data plane: registry, links).
using RunSubOp = std::function<SubOpResult(SubRing ring, const OpParams& params)>;

// `p`: the caller's all-reduce (key, dtype, op, input, work, count).
SubOpResult two_level_all_reduce(const OpParams& p, const TwoLevelGeometry& g, const RunSubOp& run);

}  // namespace pyccl
