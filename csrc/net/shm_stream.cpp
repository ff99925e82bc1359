#include "net/shm_stream.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/time.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

namespace pyccl::net {
namespace {

// Bytes moved between two publications of a cursor: small enough that the
// other side starts copying while this one still copies (a quarter of the
// ring at most, so a full ring still leaves room to overlap), large enough
// that the publication is noise.
constexpr size_t kMaxPiece = 256u << 10;

[[noreturn]] void fail(const std::string& what, int err) {
  throw SocketError(what + ": " + std::strerror(err));
}

constexpr unsigned kSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;

}  // namespace

size_t shm_ring_bytes() {
  static const size_t bytes = [] {
    const char* env = std::getenv("PYCCL_SHM_RING_BYTES");
    const long long v = env ? std::atoll(env) : 0;
    if (v <= 0) return size_t{4u << 20};
    return std::clamp(static_cast<size_t>(v), kShmMinCapacity, kShmMaxCapacity);
  }();
  return bytes;
}

// ------------------------------------------------------------------ region

ShmRegion::~ShmRegion() {
  if (base_ != nullptr) ::munmap(base_, bytes_);
}

ShmRegion::ShmRegion(ShmRegion&& o) noexcept : base_(o.base_), bytes_(o.bytes_), capacity_(o.capacity_) {
  o.base_ = nullptr;
}

ShmRegion& ShmRegion::operator=(ShmRegion&& o) noexcept {
  if (this != &o) {
    if (base_ != nullptr) ::munmap(base_, bytes_);
    base_ = o.base_;
    bytes_ = o.bytes_;
    capacity_ = o.capacity_;
    o.base_ = nullptr;
  }
  return *this;
}

ShmRegion ShmRegion::create(size_t capacity, int& fd) {
  fd = ::memfd_create("pyccl-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) fail("memfd_create", errno);
  ShmRegion r;
  r.capacity_ = capacity;
  r.bytes_ = kShmDataOffset + capacity;
  // Sealed at its size: the reader can then never be hit by SIGBUS from a
  // ring that shrank under it.
  if (::ftruncate(fd, static_cast<off_t>(r.bytes_)) != 0 || ::fcntl(fd, F_ADD_SEALS, kSeals) != 0) {
    const int err = errno;
    ::close(fd);
    fd = -1;
    fail("sizing the shared-memory ring", err);
  }
  void* p = ::mmap(nullptr, r.bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    ::close(fd);
    fd = -1;
    fail("mmap of the shared-memory ring", err);
  }
  r.base_ = p;
  auto* h = new (p) ShmRingHeader{};
  h->magic = kShmMagic;
  h->capacity = capacity;
  return r;
}

ShmRegion ShmRegion::attach(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail("fstat of the shared-memory ring", errno);
  const int seals = ::fcntl(fd, F_GET_SEALS);
  const size_t bytes = static_cast<size_t>(st.st_size);
  if (seals < 0 || (static_cast<unsigned>(seals) & kSeals) != kSeals || bytes < kShmDataOffset + kShmMinCapacity ||
      bytes > kShmDataOffset + kShmMaxCapacity)
    throw SocketError("the offered shared-memory ring is not a sealed ring of a valid size");
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) fail("mmap of the shared-memory ring", errno);
  ShmRegion r;
  r.base_ = p;
  r.bytes_ = bytes;
  r.capacity_ = bytes - kShmDataOffset;  // from the sealed size, never from the shared header
  if (r.header()->magic != kShmMagic || r.header()->capacity != r.capacity_)
    throw SocketError("the offered shared-memory ring has a bad header");
  return r;
}

// ------------------------------------------------------------------ stream

ShmStream::ShmStream(Socket doorbell, ShmRegion region, Role role, double wait_timeout_s)
    : ShmStream(doorbell.fd(), std::move(region), role, wait_timeout_s) {
  owned_ = std::move(doorbell);
}

ShmStream::ShmStream(int borrowed_fd, ShmRegion region, Role role, double wait_timeout_s)
    : fd_(borrowed_fd),
      region_(std::move(region)),
      ring_(region_.header()),
      data_(region_.data()),
      cap_(region_.capacity()),
      piece_(std::min<size_t>(kMaxPiece, region_.capacity() / 4)),
      role_(role) {
  // Doorbells are single bytes that must leave at once, never wait for Nagle.
  int one = 1;
  ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  // A reader waits for data at most wait_timeout_s (keepalives come every
  // keepalive interval); a writer waits for space as long as it takes (the
  // reader may be waiting for its own op to start), until an abort.
  timeval tv{};
  if (role == Role::Reader) {
    tv.tv_sec = static_cast<time_t>(wait_timeout_s);
    tv.tv_usec = static_cast<suseconds_t>((wait_timeout_s - static_cast<double>(tv.tv_sec)) * 1e6);
    if (tv.tv_sec == 0 && tv.tv_usec == 0) tv.tv_usec = 1000;
  }
  ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

void ShmStream::check_open() const {
  if (closed_.load(std::memory_order_relaxed)) throw SocketError("the link was shut down", SocketError::Kind::Closed);
}

void ShmStream::shutdown_both() {
  closed_ = true;
  ::shutdown(fd_, SHUT_RDWR);
}

void ShmStream::ring_bell() {
  const char b = 1;
  for (;;) {
    const ssize_t k = ::send(fd_, &b, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k == 1) return;
    if (k < 0 && errno == EINTR) continue;
    // A full socket buffer holds bells the other side has not read yet: it
    // will wake anyway.
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    fail("doorbell send", errno);
  }
}

void ShmStream::sleep_until_bell() {
  // One blocking recv (bounded by SO_RCVTIMEO, set in the constructor): it
  // returns the doorbells, 0 when the neighbour's end closed (it died) or the
  // link was shut down, or a timeout.
  char bells[256];
  ssize_t k;
  do {
    k = ::recv(fd_, bells, sizeof(bells), 0);
  } while (k < 0 && errno == EINTR);
  if (k == 0) throw SocketError("connection closed by peer", SocketError::Kind::Closed);
  if (k < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) throw SocketError("receive timed out", SocketError::Kind::Timeout);
    fail("recv", errno);
  }
}

void ShmStream::publish_tail() {
  // seq_cst store, then seq_cst load of the flag: with the reader's store
  // of the flag then load of the tail, one of us sees the other (no lost wake-up).
  ring_->tail.store(cursor_, std::memory_order_seq_cst);
  if (ring_->reader_waiting.load(std::memory_order_seq_cst) != 0 &&
      ring_->reader_waiting.exchange(0, std::memory_order_seq_cst) != 0)
    ring_bell();
}

void ShmStream::write_iov(const iovec* iov, int iovcnt) {
  if (role_ != Role::Writer) throw SocketError("write on the reading end of a shared-memory link");
  // A frame (header + payload) is published as one piece when it fits, so
  // a waiting reader is woken once per frame, not once for the header and
  // again for the payload; a big payload is published every piece_ bytes so
  // that the reader copies out while the rest is copied in.
  uint64_t published = cursor_;
  for (int i = 0; i < iovcnt; ++i) {
    const char* p = static_cast<const char*>(iov[i].iov_base);
    size_t n = iov[i].iov_len;
    while (n > 0) {
      check_open();
      const uint64_t used = cursor_ - ring_->head.load(std::memory_order_acquire);
      if (used > cap_) throw SocketError("the shared-memory ring's head is corrupt");
      if (used == cap_) {
        if (published != cursor_) {
          publish_tail();
          published = cursor_;
          continue;
        }
        // Full: announce it, look again (the reader may have freed space in
        // between), then sleep on the connection until the reader rings.
        ring_->writer_waiting.store(1, std::memory_order_seq_cst);
        if (cursor_ - ring_->head.load(std::memory_order_seq_cst) < cap_) {
          ring_->writer_waiting.store(0, std::memory_order_relaxed);
        } else {
          sleep_until_bell();
        }
        continue;
      }
      const size_t k = std::min({n, static_cast<size_t>(cap_ - used), piece_});
      const size_t off = cursor_ % cap_;
      const size_t first = std::min(k, static_cast<size_t>(cap_ - off));
      std::memcpy(data_ + off, p, first);
      std::memcpy(data_, p + first, k - first);
      cursor_ += k;
      p += k;
      n -= k;
      if (cursor_ - published >= piece_) {
        publish_tail();
        published = cursor_;
      }
    }
  }
  if (published != cursor_) publish_tail();
}

void ShmStream::read_bytes(char* dst, size_t n) {
  if (role_ != Role::Reader) throw SocketError("read on the writing end of a shared-memory link");
  while (n > 0) {
    check_open();
    const uint64_t avail = ring_->tail.load(std::memory_order_acquire) - cursor_;
    if (avail > cap_) throw SocketError("the shared-memory ring's tail is corrupt");
    if (avail == 0) {
      ring_->reader_waiting.store(1, std::memory_order_seq_cst);
      if (ring_->tail.load(std::memory_order_seq_cst) != cursor_) {
        ring_->reader_waiting.store(0, std::memory_order_relaxed);
      } else {
        sleep_until_bell();
      }
      continue;
    }
    const size_t k = std::min({n, static_cast<size_t>(avail), piece_});
    const size_t off = cursor_ % cap_;
    const size_t first = std::min(k, static_cast<size_t>(cap_ - off));
    if (dst != nullptr) {
      std::memcpy(dst, data_ + off, first);
      std::memcpy(dst + first, data_, k - first);
      dst += k;
    }
    cursor_ += k;
    n -= k;
    ring_->head.store(cursor_, std::memory_order_seq_cst);
    if (ring_->writer_waiting.load(std::memory_order_seq_cst) != 0 &&
        ring_->writer_waiting.exchange(0, std::memory_order_seq_cst) != 0)
      ring_bell();
  }
}

bool ShmStream::writable_now(size_t n) const {
  // Only the writer moves the tail, so the free space it sees can only grow.
  return role_ == Role::Writer && cap_ - (cursor_ - ring_->head.load(std::memory_order_acquire)) >= n;
}

void ShmStream::send_all(const void* data, size_t n) {
  const iovec iov{const_cast<void*>(data), n};
  write_iov(&iov, 1);
}

void ShmStream::sendv_all(iovec* iov, int iovcnt) { write_iov(iov, iovcnt); }

void ShmStream::recv_exact(void* data, size_t n) { read_bytes(static_cast<char*>(data), n); }

void ShmStream::discard(size_t n) { read_bytes(nullptr, n); }

}  // namespace pyccl::net
