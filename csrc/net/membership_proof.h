// Proof of membership on data-plane connections (ring links, state fetches).
//
// In a run with a secret every member derives the epoch's key from the
// secret and the epoch's salt (sent by the master to members only; see
// pyccl/auth.py). A connection's acceptor speaks first: a fresh 32-byte
// nonce. The initiator answers with its opening frame (LinkHello or the
// first StateRequest) followed by HMAC-SHA256(key, "pyccl-v1 data" | nonce |
// opening frame). The acceptor checks the proof before it acts on any field
// but the epoch (which names the key), so a stranger, a replayed opening or
// a peer of another epoch is closed before a byte of its reaches a buffer.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/hmac.h"
#include "net/socket.h"

namespace pyccl::net {

inline constexpr size_t kNonceBytes = 32;
inline constexpr size_t kProofBytes = 32;
using Nonce = std::array<uint8_t, kNonceBytes>;

// Acceptor: a fresh random nonce, sent at once.
Nonce send_challenge(Socket& sock);

// Initiator with `key` (non-empty): read the acceptor's nonce, then send the
// opening frame and its proof.
void send_opening(Socket& sock, const std::string& key, const void* opening, size_t n);

// Acceptor: whether `proof` proves `opening` under `key` for `nonce`.
bool proof_ok(const std::string& key, const Nonce& nonce, const void* opening, size_t n, const uint8_t* proof);

}  // namespace pyccl::net
