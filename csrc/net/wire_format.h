// Binary frames of the data plane. All integers are little-endian.
//
// A connection starts with a LinkHello (who I am, which epoch, which slot of
// the pool); after that it carries DataHeader + payload frames. Every field
// is validated by the receiver before any payload byte is placed, so a
// garbage or hostile connection can only get itself closed.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace pyccl::net {

inline constexpr uint32_t kLinkMagic = 0x4B4E4C50;  // "PLNK"
inline constexpr uint32_t kDataMagic = 0x41544450;  // "PDTA"
inline constexpr uint8_t kWireVersion = 1;
inline constexpr uint32_t kMaxConnections = 64;
inline constexpr uint32_t kMaxChunkBytes = 4u << 20;

// Start: one payload-less frame per op to the next peer, so that peers that
// disagree about the op (size, dtype, op, world size) find out even when
// their layouts have no chunk to exchange (e.g. an empty tensor).
// Keepalive: no payload, sent on idle connections so that a receiver can
// tell a silent link from a quiet one.
enum class Phase : uint8_t { ReduceScatter = 1, AllGather = 2, Keepalive = 3, Start = 4 };

struct LinkHello {
  uint32_t magic = kLinkMagic;
  uint8_t version = kWireVersion;
  uint8_t ring = 0;  // which ring of the epoch: 0 the ring; 1, 2 the two-level rings
  uint8_t reserved[2] = {0, 0};
  uint64_t epoch = 0;
  uint64_t from_peer = 0;  // master-assigned peer id of the sender
  uint64_t to_peer = 0;    // who the sender thinks it is talking to
  uint32_t conn_index = 0; // slot in the pool, < conn_count
  uint32_t conn_count = 0; // pool size K of the sender
};
static_assert(sizeof(LinkHello) == 40, "LinkHello layout");

struct DataHeader {
  uint32_t magic = kDataMagic;
  uint8_t version = kWireVersion;
  uint8_t phase = 0;   // Phase
  uint8_t dtype = 0;   // DType
  uint8_t redop = 0;   // RedOp
  uint64_t epoch = 0;
  uint32_t tag = 0;
  uint32_t chunk = 0;  // chunk index within the op's layout
  uint64_t seq = 0;
  uint64_t total_bytes = 0;  // size of the whole tensor: peers must agree
  uint64_t offset = 0;       // byte offset of this chunk in the tensor
  uint32_t length = 0;       // payload bytes that follow
  uint32_t world_size = 0;   // sender's view, must match the receiver's
};
static_assert(sizeof(DataHeader) == 56, "DataHeader layout");

// The structs above are laid out without padding; on little-endian hosts
// (all we support, checked at build time) they are sent as-is.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "pyccl's data plane assumes a little-endian host");

}  // namespace pyccl::net
