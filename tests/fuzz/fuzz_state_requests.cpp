// libFuzzer harness: shared-state requests, as a holder's StateServer serves
// them on a fetcher's connection (state/state_server.cpp).
//
// Three keys are published (one empty); the input is the byte stream a
// fetcher sends: requests, each answered by a reply header and, when valid,
// the bytes. It is written to one end of a socketpair; the server reads the
// other end until EOF, as it would a TCP connection. A reader thread takes
// the replies and checks that every Ok reply carries exactly the published
// bytes it names, so a request that makes the server read outside a
// published buffer shows up (ASan) as does one that serves the wrong bytes
// (abort).
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "net/socket.h"
#include "state/state_server.h"

using namespace pyccl;

namespace {

std::vector<uint8_t> make_key(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7u);
  return v;
}

bool read_all(int fd, void* out, size_t n) {
  auto* p = static_cast<uint8_t*>(out);
  while (n > 0) {
    ssize_t k = ::read(fd, p, n);
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using state::StateReply;
  using state::StateRequest;
  if (size < sizeof(StateRequest)) return 0;
  static const std::vector<uint8_t> k0 = make_key(1000, 1), k1 = make_key(64, 2), k2;
  static const uint64_t hashes[3] = {0x1111, 0x2222, 0x3333};
  const std::vector<uint8_t>* keys[3] = {&k0, &k1, &k2};
  state::StateServer server;
  server.publish({{k0.data(), k0.size(), hashes[0]}, {k1.data(), k1.size(), hashes[1]},
                  {k2.empty() ? nullptr : k2.data(), 0, hashes[2]}});

  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) std::abort();
  StateRequest first;
  std::memcpy(&first, data, sizeof(first));
  // The fetcher: sends the rest of the input, then reads every reply.
  std::vector<StateRequest> sent{first};
  for (size_t off = sizeof(first); off + sizeof(StateRequest) <= size; off += sizeof(StateRequest)) {
    StateRequest r;
    std::memcpy(&r, data + off, sizeof(r));
    sent.push_back(r);
  }
  std::thread fetcher([&] {
    size_t rest = size - sizeof(first);
    const uint8_t* p = data + sizeof(first);
    while (rest > 0) {
      ssize_t k = ::send(fds[1], p, rest, MSG_NOSIGNAL);
      if (k <= 0) break;
      p += k;
      rest -= static_cast<size_t>(k);
    }
    ::shutdown(fds[1], SHUT_WR);
    for (const StateRequest& r : sent) {
      StateReply reply;
      if (!read_all(fds[1], &reply, sizeof(reply))) break;
      if (reply.magic != state::kReplyMagic) std::abort();
      if (reply.status != static_cast<uint32_t>(state::ReplyStatus::Ok)) break;  // the server closes
      if (r.key_index >= 3 || reply.length != r.length) std::abort();
      const std::vector<uint8_t>& key = *keys[r.key_index];
      if (r.offset > key.size() || r.length > key.size() - r.offset) std::abort();
      std::vector<uint8_t> got(reply.length);
      if (!read_all(fds[1], got.data(), got.size())) break;
      if (!got.empty() && std::memcmp(got.data(), key.data() + r.offset, got.size()) != 0) std::abort();
    }
  });
  {
    net::Socket sock(fds[0]);
    server.serve(sock, first);
  }  // closes fds[0]: the fetcher sees EOF
  fetcher.join();
  ::close(fds[1]);
  server.unpublish();
  return 0;
}
