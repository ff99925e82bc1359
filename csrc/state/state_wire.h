// Frames of the shared-state transfer (see docs/architecture.md). A fetcher
// connects to a holder's data-plane port and sends StateRequests; each is
// answered by a StateReply header, followed by the bytes when status is Ok.
#pragma once

#include <cstdint>

namespace pyccl::state {

inline constexpr uint32_t kRequestMagic = 0x51525350;  // "PSRQ"
inline constexpr uint32_t kReplyMagic = 0x50525350;    // "PSRP"
inline constexpr uint64_t kMaxPieceBytes = 64u << 20;

enum class ReplyStatus : uint32_t { Ok = 0, NotAvailable = 1, OutOfRange = 2 };

struct StateRequest {
  uint32_t magic = kRequestMagic;
  uint32_t key_index = 0;
  uint64_t expected_hash = 0;  // served only if the published key has this hash
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t reserved = 0;
};
static_assert(sizeof(StateRequest) == 40, "StateRequest layout");

struct StateReply {
  uint32_t magic = kReplyMagic;
  uint32_t status = 0;  // ReplyStatus
  uint64_t length = 0;
};
static_assert(sizeof(StateReply) == 16, "StateReply layout");

}  // namespace pyccl::state
