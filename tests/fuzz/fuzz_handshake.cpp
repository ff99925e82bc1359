// libFuzzer harness: the opening of a connection to a data port
// (DataPlane::serve_incoming): the acceptor's challenge, the opening frame
// (a ring-link hello or a state request, told apart by their magic), its
// proof of membership, then whatever the connection sends next.
//
// One DataPlane lives for the whole run, in an epoch whose key the harness
// knows, so the fuzzer reaches both sides of every check: the first input
// byte turns authentication on or off and says whether the harness replaces
// the input's proof with a valid one (computed the way a member would). The
// rest is written to one end of a socketpair whose other end is served. A
// hello for an epoch not yet reached is not held (set_hello_wait(0)), so an
// input never waits.
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/hmac.h"
#include "dataplane.h"
#include "net/membership_proof.h"

using namespace pyccl;

namespace {

const std::string kKey(32, 'k');

DataPlane& data_plane() {
  static DataPlane* dp = [] {
    auto* d = new DataPlane("127.0.0.1", 0, 1);
    d->set_hello_wait(0.0);
    net::EpochInfo info;
    info.epoch = 5;
    info.my_id = 1;
    info.world_size = 1;
    info.key = kKey;
    d->set_epoch(info);
    return d;
  }();
  return *dp;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  constexpr size_t kOpening = 40;
  if (size < 1) return 0;
  DataPlane& dp = data_plane();
  const bool authenticate = data[0] & 1;
  const bool valid_proof = data[0] & 2;
  dp.set_authenticate(authenticate);
  std::vector<uint8_t> stream(data + 1, data + size);

  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) std::abort();
  std::thread client([&] {
    if (authenticate) {
      uint8_t nonce[net::kNonceBytes];
      size_t got = 0;
      while (got < sizeof(nonce)) {
        ssize_t k = ::read(fds[1], nonce + got, sizeof(nonce) - got);
        if (k <= 0) break;
        got += static_cast<size_t>(k);
      }
      if (valid_proof && got == sizeof(nonce) && stream.size() >= kOpening + net::kProofBytes) {
        static const char label[] = "pyccl-v1 data";
        const Digest proof = hmac_sha256(kKey, {{label, sizeof(label) - 1}, {nonce, sizeof(nonce)},
                                                {stream.data(), kOpening}});
        std::memcpy(stream.data() + kOpening, proof.data(), proof.size());
      }
    }
    size_t off = 0;
    while (off < stream.size()) {
      ssize_t k = ::send(fds[1], stream.data() + off, stream.size() - off, MSG_NOSIGNAL);
      if (k <= 0) break;
      off += static_cast<size_t>(k);
    }
    ::shutdown(fds[1], SHUT_WR);
    uint8_t sink[4096];
    while (::read(fds[1], sink, sizeof(sink)) > 0) {
    }
  });
  {
    net::Socket sock(fds[0]);
    dp.serve_incoming(sock);
  }  // closes fds[0]: the client's read sees EOF
  client.join();
  ::close(fds[1]);
  return 0;
}
