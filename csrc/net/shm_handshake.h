// Turning an accepted ring link into a shared-memory one (shm_stream.h).
//
// Runs on the link's TCP connection right after its LinkHello (and, in a run
// with a secret, its proof of membership: a link is never upgraded before
// it proved itself). The initiator asked for it with kLinkWantsShm in the
// hello, because the master says the two peers share a host.
//
//   acceptor -> initiator   ShmOffer: ok, the abstract Unix socket to use, a one-time token
//   initiator -> Unix       the token, with the ring's memfd (SCM_RIGHTS)
//   acceptor -> initiator   one byte: mapped, the link is up
//
// The ring is anonymous memory: nothing is named in /dev/shm, so a crash at
// any point leaves nothing behind. The token ties the Unix connection to the
// authenticated TCP link: whoever else connects to the Unix socket gets
// nothing and gives nothing. An acceptor that cannot offer (no memfd, say)
// answers ok = 0 and the link stays TCP.
#pragma once

#include <cstdint>
#include <memory>

#include "net/byte_stream.h"
#include "net/shm_stream.h"
#include "net/socket.h"

namespace pyccl::net {

// LinkHello.reserved[0] bit: the initiator asks for a shared-memory link.
inline constexpr uint8_t kLinkWantsShm = 1;

inline constexpr uint32_t kShmOfferMagic = 0x4D485350;  // "PSHM"

struct ShmOffer {
  uint32_t magic = kShmOfferMagic;
  uint8_t ok = 0;
  uint8_t reserved[3] = {0, 0, 0};
  char name[56] = {};     // abstract Unix socket name (without the leading NUL)
  uint8_t token[32] = {};
};
static_assert(sizeof(ShmOffer) == 96, "ShmOffer layout");

// Initiator: after the hello went out with kLinkWantsShm. Returns the link's
// stream: a ShmStream writing into a ring of `ring_bytes`, or the socket
// itself if the acceptor declined. Throws SocketError on failure.
std::unique_ptr<ByteStream> initiate_shm(Socket sock, size_t ring_bytes, double timeout_s);

// Acceptor: offer, receive and map the ring. Returns the reading stream over
// `sock` (borrowed), or nullptr if it cannot offer (the link stays TCP).
// Throws SocketError if the initiator misbehaves or times out.
std::unique_ptr<ShmStream> accept_shm(Socket& sock, double timeout_s, double link_timeout_s);

}  // namespace pyccl::net
