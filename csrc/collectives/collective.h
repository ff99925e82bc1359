// Which collective an op runs, and the little the rest of the data plane
// knows about one: its wire code, its name, how its layout derives from the
// caller's tensor, and how to make its plan. Everything else about a
// collective lives in its own file (see plan.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace pyccl {

class Op;
class CollectivePlan;

// Travels in the high nibble of the header's op byte, so peers that call
// different collectives get a mismatch. Never renumber (wire format).
// AllReduceGather is how the data plane runs a small all_reduce (see
// gather_allreduce.h): its own value, so that a peer that picked the ring
// for the same call (it saw another size) gets a mismatch, not garbage.
enum class Collective : uint8_t {
  AllReduce = 0,
  ReduceScatter = 1,
  AllGather = 2,
  Broadcast = 3,
  AllReduceQ8 = 4,
  AllReduceGather = 5,
};

// Defined by each collective's file, listed by wire code in collective.cpp.
struct CollectiveSpec {
  Collective code;
  const char* name;  // as the caller knows it, for error messages
  // The layout of a call over `count` elements in a world of n: one segment
  // (a chain from a root) instead of n, and count x n elements (one
  // caller-sized input per peer) instead of count.
  bool one_segment;
  bool one_input_per_peer;
  std::unique_ptr<CollectivePlan> (*make_plan)(Op& op);
};

// nullptr for a code no collective has (a confused or hostile peer).
const CollectiveSpec* find_collective(uint8_t code);
const CollectiveSpec& collective_spec(Collective c);
const char* collective_name(Collective c);
// Bytes of the caller's tensor for an op whose layout spans `total_bytes`,
// for error messages.
uint64_t call_bytes(const CollectiveSpec& spec, uint64_t total_bytes, uint32_t world_size);

}  // namespace pyccl
