#include "net/membership_proof.h"

#include <random>

namespace pyccl::net {

namespace {
constexpr char kLabel[] = "pyccl-v1 data";

Digest proof_of(const std::string& key, const uint8_t* nonce, const void* opening, size_t n) {
  return hmac_sha256(key, {{kLabel, sizeof(kLabel) - 1}, {nonce, kNonceBytes}, {opening, n}});
}
}  // namespace

Nonce send_challenge(Socket& sock) {
  // std::random_device reads the kernel's entropy source (getrandom/urandom).
  thread_local std::random_device rd;
  Nonce nonce;
  for (size_t i = 0; i < nonce.size(); i += 4) {
    const uint32_t r = rd();
    for (size_t j = 0; j < 4; ++j) nonce[i + j] = static_cast<uint8_t>(r >> (8 * j));
  }
  sock.send_all(nonce.data(), nonce.size());
  return nonce;
}

void send_opening(Socket& sock, const std::string& key, const void* opening, size_t n) {
  Nonce nonce;
  sock.recv_exact(nonce.data(), nonce.size());
  const Digest proof = proof_of(key, nonce.data(), opening, n);
  iovec iov[2] = {{const_cast<void*>(opening), n}, {const_cast<uint8_t*>(proof.data()), proof.size()}};
  sock.sendv_all(iov, 2);
}

bool proof_ok(const std::string& key, const Nonce& nonce, const void* opening, size_t n, const uint8_t* proof) {
  if (key.empty()) return false;
  const Digest want = proof_of(key, nonce.data(), opening, n);
  return same_digest(want.data(), proof, want.size());
}

}  // namespace pyccl::net
