// Thin RAII wrappers over blocking TCP sockets.
//
// The data plane uses one thread per connection direction and blocking I/O:
// an idle peer sleeps in recv()/condition variables and uses no CPU, and
// shutdown() is the way another thread wakes a blocked one (abort).
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "net/byte_stream.h"

namespace pyccl::net {

// Thrown for any socket-level failure; what() names the operation and errno.
class SocketError : public std::exception {
 public:
  // Why a socket call failed, for callers that act on it (the message is for people).
  enum class Kind { Other, Timeout, Closed };
  explicit SocketError(std::string msg, Kind kind = Kind::Other) : msg_(std::move(msg)), kind_(kind) {}
  const char* what() const noexcept override { return msg_.c_str(); }
  Kind kind() const noexcept { return kind_; }

 private:
  std::string msg_;
  Kind kind_;
};

class Socket final : public ByteStream {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket() override { close(); }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  Socket(Socket&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Socket& operator=(Socket&& o) noexcept;

  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void close();
  // Wake any thread blocked on this socket; safe to call from another thread.
  void shutdown_both() override;

  // Tuning for bulk transfer: TCP_NODELAY and large kernel buffers.
  void tune_for_bulk();
  void set_recv_timeout(double seconds);
  void set_send_timeout(double seconds);

  // Blocking helpers; throw SocketError on error and on EOF.
  void send_all(const void* data, size_t n) override;
  void sendv_all(struct iovec* iov, int iovcnt) override;
  void recv_exact(void* data, size_t n) override;
  // Read and drop n bytes (used to skip the payload of a frame we reject).
  void discard(size_t n) override;

  std::string peer_name() const;

 private:
  int fd_ = -1;
};

Socket listen_tcp(const std::string& host, uint16_t port, int backlog = 128);
uint16_t local_port(const Socket& s);
Socket accept_tcp(const Socket& listener);  // returns an invalid Socket when the listener was shut down
// source_host: bind the local end to this address first ("": the kernel's choice).
Socket connect_tcp(const std::string& host, uint16_t port, double timeout_s, const std::string& source_host = "");

}  // namespace pyccl::net
