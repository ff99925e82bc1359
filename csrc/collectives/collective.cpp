#include "collectives/collective.h"

#include <iterator>

namespace pyccl {

// Each is defined in its collective's own file.
extern const CollectiveSpec kAllReduceSpec;
extern const CollectiveSpec kReduceScatterSpec;
extern const CollectiveSpec kAllGatherSpec;
extern const CollectiveSpec kBroadcastSpec;
extern const CollectiveSpec kAllReduceQ8Spec;
extern const CollectiveSpec kAllReduceGatherSpec;

namespace {
// Indexed by wire code (the unit tests check that every entry sits at its code).
const CollectiveSpec* const kSpecs[] = {
    &kAllReduceSpec, &kReduceScatterSpec, &kAllGatherSpec, &kBroadcastSpec, &kAllReduceQ8Spec, &kAllReduceGatherSpec,
};
}  // namespace

const CollectiveSpec* find_collective(uint8_t code) { return code < std::size(kSpecs) ? kSpecs[code] : nullptr; }

const CollectiveSpec& collective_spec(Collective c) { return *kSpecs[static_cast<uint8_t>(c)]; }

const char* collective_name(Collective c) {
  const CollectiveSpec* spec = find_collective(static_cast<uint8_t>(c));
  return spec ? spec->name : "?";
}

uint64_t call_bytes(const CollectiveSpec& spec, uint64_t total_bytes, uint32_t world_size) {
  return spec.one_input_per_peer && world_size > 0 ? total_bytes / world_size : total_bytes;
}

}  // namespace pyccl
