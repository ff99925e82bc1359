#include "net/socket.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace pyccl::net {
namespace {

// Kernel socket buffer size to request, from PYCCL_SOCKET_BUFFER (bytes);
// 0 leaves Linux's autotuning on, which is the default: an explicit size
// disables autotuning and is clamped to net.core.{r,w}mem_max.
int socket_buffer_bytes() {
  static const int bytes = [] {
    const char* env = std::getenv("PYCCL_SOCKET_BUFFER");
    return env ? std::atoi(env) : 0;
  }();
  return bytes;
}

void apply_buffer_size(int fd) {
  int buf = socket_buffer_bytes();
  if (buf <= 0) return;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
}

[[noreturn]] void fail(const std::string& what, int err) {
  throw SocketError(what + ": " + std::strerror(err));
}

sockaddr_in resolve(const std::string& host, uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (host.empty() || host == "0.0.0.0") {
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    return addr;
  }
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) == 1) return addr;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr) throw SocketError("cannot resolve host '" + host + "': " + gai_strerror(rc));
  addr.sin_addr = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr;
  freeaddrinfo(res);
  return addr;
}

}  // namespace

Socket& Socket::operator=(Socket&& o) noexcept {
  if (this != &o) {
    close();
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

void Socket::close() {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

void Socket::shutdown_both() {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
}

void Socket::tune_for_bulk() {
  int one = 1;
  setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  apply_buffer_size(fd_);
}

namespace {
timeval to_timeval(double seconds) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(seconds);
  tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
  return tv;
}
}  // namespace

void Socket::set_recv_timeout(double seconds) {
  timeval tv = to_timeval(seconds);
  setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

void Socket::set_send_timeout(double seconds) {
  timeval tv = to_timeval(seconds);
  setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

void Socket::send_all(const void* data, size_t n) {
  iovec iov{const_cast<void*>(data), n};
  sendv_all(&iov, 1);
}

void Socket::sendv_all(iovec* iov, int iovcnt) {
  while (iovcnt > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(iovcnt);
    ssize_t k = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) throw SocketError("send timed out", SocketError::Kind::Timeout);
      fail("send", errno);
    }
    size_t left = static_cast<size_t>(k);
    while (iovcnt > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --iovcnt;
    }
    if (iovcnt > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
}

void Socket::recv_exact(void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t k = ::recv(fd_, p, n, 0);
    if (k == 0) throw SocketError("connection closed by peer", SocketError::Kind::Closed);
    if (k < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) throw SocketError("receive timed out", SocketError::Kind::Timeout);
      fail("recv", errno);
    }
    p += k;
    n -= static_cast<size_t>(k);
  }
}

void Socket::discard(size_t n) {
  char scratch[16384];
  while (n > 0) {
    size_t k = n < sizeof(scratch) ? n : sizeof(scratch);
    recv_exact(scratch, k);
    n -= k;
  }
}

std::string Socket::peer_name() const {
  sockaddr_in addr{};
  socklen_t len = sizeof(addr);
  if (getpeername(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return "?";
  char buf[INET_ADDRSTRLEN] = {0};
  inet_ntop(AF_INET, &addr.sin_addr, buf, sizeof(buf));
  return std::string(buf) + ":" + std::to_string(ntohs(addr.sin_port));
}

Socket listen_tcp(const std::string& host, uint16_t port, int backlog) {
  Socket s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!s.valid()) fail("socket", errno);
  int one = 1;
  setsockopt(s.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  // Buffer sizes must be set on the listener to apply to accepted sockets
  // before the handshake (window scaling is negotiated in the SYN).
  apply_buffer_size(s.fd());
  sockaddr_in addr = resolve(host, port);
  if (::bind(s.fd(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    fail("bind " + host + ":" + std::to_string(port), errno);
  if (::listen(s.fd(), backlog) != 0) fail("listen", errno);
  return s;
}

uint16_t local_port(const Socket& s) {
  sockaddr_in addr{};
  socklen_t len = sizeof(addr);
  if (getsockname(s.fd(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) fail("getsockname", errno);
  return ntohs(addr.sin_port);
}

Socket accept_tcp(const Socket& listener) {
  for (;;) {
    int fd = ::accept4(listener.fd(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) return Socket(fd);
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
      // Out of descriptors: back off instead of spinning on the error.
      ::poll(nullptr, 0, 100);
      continue;
    }
    return Socket();  // EINVAL after shutdown(): the listener is closing
  }
}

Socket connect_tcp(const std::string& host, uint16_t port, double timeout_s, const std::string& source_host) {
  sockaddr_in addr = resolve(host, port);
  Socket s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!s.valid()) fail("socket", errno);
  if (!source_host.empty()) {
    // A peer with its own data address sends from it too, so the other end
    // (or an emulator on the path) sees which peer a connection comes from.
    sockaddr_in local = resolve(source_host, 0);
    if (::bind(s.fd(), reinterpret_cast<sockaddr*>(&local), sizeof(local)) != 0)
      fail("bind " + source_host, errno);
  }
  apply_buffer_size(s.fd());
  // Non-blocking connect bounded by poll(), then back to blocking mode.
  int flags = fcntl(s.fd(), F_GETFL, 0);
  fcntl(s.fd(), F_SETFL, flags | O_NONBLOCK);
  int rc = ::connect(s.fd(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  if (rc != 0 && errno != EINPROGRESS) fail("connect " + host + ":" + std::to_string(port), errno);
  if (rc != 0) {
    pollfd p{s.fd(), POLLOUT, 0};
    int timeout_ms = static_cast<int>(timeout_s * 1000);
    int pr;
    do {
      pr = ::poll(&p, 1, timeout_ms);
    } while (pr < 0 && errno == EINTR);
    if (pr == 0) throw SocketError("connect " + host + ":" + std::to_string(port) + ": timed out", SocketError::Kind::Timeout);
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(s.fd(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) fail("connect " + host + ":" + std::to_string(port), err);
  }
  fcntl(s.fd(), F_SETFL, flags);
  s.tune_for_bulk();
  return s;
}

}  // namespace pyccl::net
