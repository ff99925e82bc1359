#include "net/shm_handshake.h"

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <random>
#include <string>

#include "common/hmac.h"
#include "common/log.h"

namespace pyccl::net {
namespace {

void random_bytes(uint8_t* out, size_t n) {
  thread_local std::random_device rd;  // the kernel's entropy source
  for (size_t i = 0; i < n; i += 4) {
    const uint32_t r = rd();
    for (size_t j = 0; j < 4 && i + j < n; ++j) out[i + j] = static_cast<uint8_t>(r >> (8 * j));
  }
}

// An abstract-namespace address: no file, gone when the socket closes.
sockaddr_un unix_addr(const char* name, socklen_t& len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  const size_t n = strnlen(name, sizeof(ShmOffer::name));
  std::memcpy(a.sun_path + 1, name, n);
  len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
  return a;
}

// Wait for `fd`; give up if `link_fd` (the TCP link, silent during the
// handshake) shows anything: EOF, an error, or the data plane's shutdown().
void wait_readable(int fd, int link_fd, double timeout_s, const char* what) {
  pollfd p[2] = {{fd, POLLIN, 0}, {link_fd, POLLIN, 0}};
  int r;
  do {
    r = ::poll(p, 2, static_cast<int>(timeout_s * 1000));
  } while (r < 0 && errno == EINTR);
  if (r == 0) throw SocketError(std::string(what) + ": timed out", SocketError::Kind::Timeout);
  if (r < 0) throw SocketError(std::string(what) + ": " + std::strerror(errno));
  if (p[1].revents != 0) throw SocketError(std::string(what) + ": the link closed", SocketError::Kind::Closed);
}

// The listener the initiator connects to; nullptr-equivalent (invalid) on failure.
Socket listen_unix(ShmOffer& offer) {
  Socket s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!s.valid()) return s;
  uint8_t rnd[16];
  random_bytes(rnd, sizeof(rnd));
  std::string name = "pyccl-shm-";
  static const char* hex = "0123456789abcdef";
  for (uint8_t b : rnd) {
    name += hex[b >> 4];
    name += hex[b & 15];
  }
  std::memcpy(offer.name, name.data(), name.size());
  socklen_t len = 0;
  sockaddr_un a = unix_addr(offer.name, len);
  if (::bind(s.fd(), reinterpret_cast<sockaddr*>(&a), len) != 0 || ::listen(s.fd(), 1) != 0) return Socket();
  return s;
}

// Receive the token and one descriptor on `conn`; returns the descriptor or -1.
int recv_ring_fd(Socket& conn, uint8_t* token) {
  char control[CMSG_SPACE(sizeof(int))] = {};
  iovec iov{token, 32};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t k;
  do {
    k = ::recvmsg(conn.fd(), &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
  } while (k < 0 && errno == EINTR);
  int fd = -1;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS && c->cmsg_len == CMSG_LEN(sizeof(int)))
      std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
  }
  if (k != 32 || (msg.msg_flags & MSG_CTRUNC) != 0) {
    if (fd >= 0) ::close(fd);
    return -1;
  }
  return fd;
}

}  // namespace

std::unique_ptr<ByteStream> initiate_shm(Socket sock, size_t ring_bytes, double timeout_s) {
  sock.set_recv_timeout(timeout_s);
  ShmOffer offer;
  sock.recv_exact(&offer, sizeof(offer));
  if (offer.magic != kShmOfferMagic) throw SocketError("the neighbour answered a shared-memory request with garbage");
  if (!offer.ok) {
    PYCCL_LOG(Info, "the neighbour declined a shared-memory link; using TCP");
    return std::make_unique<Socket>(std::move(sock));
  }
  offer.name[sizeof(offer.name) - 1] = 0;
  int fd = -1;
  ShmRegion region = ShmRegion::create(ring_bytes, fd);
  Socket unix_conn(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  socklen_t len = 0;
  sockaddr_un a = unix_addr(offer.name, len);
  if (!unix_conn.valid() || ::connect(unix_conn.fd(), reinterpret_cast<sockaddr*>(&a), len) != 0) {
    const int err = errno;
    ::close(fd);
    throw SocketError(std::string("connect to the neighbour's shared-memory socket: ") + std::strerror(err));
  }
  char control[CMSG_SPACE(sizeof(int))] = {};
  iovec iov{offer.token, sizeof(offer.token)};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  ssize_t k;
  do {
    k = ::sendmsg(unix_conn.fd(), &msg, MSG_NOSIGNAL);
  } while (k < 0 && errno == EINTR);
  const int err = errno;
  ::close(fd);  // our mapping keeps the memory; the reader now holds its own reference
  if (k != static_cast<ssize_t>(sizeof(offer.token)))
    throw SocketError(std::string("handing the ring to the neighbour: ") + std::strerror(err));
  uint8_t mapped = 0;
  sock.recv_exact(&mapped, 1);
  if (mapped != 1) throw SocketError("the neighbour refused the shared-memory ring");
  return std::make_unique<ShmStream>(std::move(sock), std::move(region), ShmStream::Role::Writer, timeout_s);
}

std::unique_ptr<ShmStream> accept_shm(Socket& sock, double timeout_s, double link_timeout_s) {
  ShmOffer offer;
  Socket listener = listen_unix(offer);
  offer.ok = listener.valid() ? 1 : 0;
  random_bytes(offer.token, sizeof(offer.token));
  sock.send_all(&offer, sizeof(offer));
  if (!offer.ok) return nullptr;
  wait_readable(listener.fd(), sock.fd(), timeout_s, "waiting for the shared-memory ring");
  Socket conn(::accept4(listener.fd(), nullptr, nullptr, SOCK_CLOEXEC));
  listener.close();  // one connection only: the name is gone from here on
  if (!conn.valid()) throw SocketError(std::string("accept on the shared-memory socket: ") + std::strerror(errno));
  conn.set_recv_timeout(timeout_s);
  uint8_t token[32] = {};
  const int fd = recv_ring_fd(conn, token);
  if (fd < 0) throw SocketError("the shared-memory ring did not arrive");
  if (!same_digest(token, offer.token, sizeof(token))) {
    ::close(fd);
    throw SocketError("a shared-memory ring came with a wrong token");
  }
  ShmRegion region;
  try {
    region = ShmRegion::attach(fd);
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  const uint8_t mapped = 1;
  sock.send_all(&mapped, 1);
  return std::make_unique<ShmStream>(sock.fd(), std::move(region), ShmStream::Role::Reader, link_timeout_s);
}

}  // namespace pyccl::net
