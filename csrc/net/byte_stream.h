// What a ring link needs of the channel its frames travel on.
//
// A link carries a byte stream: DataHeader + payload, in order. Over TCP the
// stream is the socket itself; between peers on one host it is a ring
// buffer in shared memory whose TCP connection only rings doorbells and
// tells a dead or hung neighbour (shm_stream.h). SendConn and the reader
// loop see only this interface, so framing, validation and liveness are the
// same code for both.
#pragma once

#include <sys/uio.h>

#include <cstddef>

namespace pyccl::net {

class ByteStream {
 public:
  virtual ~ByteStream() = default;
  // Blocking; throw SocketError on error, on EOF and on timeout.
  virtual void send_all(const void* data, size_t n) = 0;
  virtual void sendv_all(struct iovec* iov, int iovcnt) = 0;
  virtual void recv_exact(void* data, size_t n) = 0;
  // Read and drop n bytes (the payload of a frame the reader rejects).
  virtual void discard(size_t n) = 0;
  // Wake any thread blocked on the stream; safe from any thread.
  virtual void shutdown_both() = 0;
  // Whether n bytes can be written now without waiting for the reader.
  // SendConn writes a frame on the caller's thread (a reader thread
  // forwarding, say) only then: a reader blocked on a full ring would stop
  // draining its own, and readers of a ring of peers could wait on each
  // other in a cycle. Sockets say yes (the kernel's buffers are the limit,
  // as before).
  virtual bool writable_now(size_t n) const {
    (void)n;
    return true;
  }
};

}  // namespace pyccl::net
