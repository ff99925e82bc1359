// SHA-256 and HMAC-SHA256 (FIPS 180-4, RFC 2104), for proving membership on
// data-plane connections without a crypto library dependency. Checked
// against Python's hashlib/hmac in tests/cpp and tests/test_data_auth.py.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace pyccl {

using Digest = std::array<uint8_t, 32>;

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  Digest finish();

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t fill_ = 0;
  uint64_t total_ = 0;
};

struct Bytes {
  const void* data;
  size_t size;
};

// HMAC-SHA256 of the concatenation of `parts` under `key`.
Digest hmac_sha256(const std::string& key, std::initializer_list<Bytes> parts);

// Compares in time independent of where the inputs differ.
bool same_digest(const uint8_t* a, const uint8_t* b, size_t n);

}  // namespace pyccl
