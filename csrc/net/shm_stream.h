// A ring link between two peers on one host: payload bytes go through a
// ring buffer in shared memory, the link's TCP connection stays as the
// doorbell and the liveness channel.
//
// Why the TCP connection stays: a process that is SIGKILLed or SIGSTOPped
// never posts a futex or a semaphore, so nobody may sleep on one. Instead a
// side that finds the ring empty (reader) or full (writer) announces it in
// the ring's header and sleeps in recv() on the connection; the other side
// sends one byte when it sees the announcement. A dead neighbour's kernel
// closes the connection (recv wakes, EOF), a hung one stops sending
// keepalives (the reader's recv times out after the link timeout), and an
// abort wakes everyone with shutdown(): exactly the TCP link's failure
// model. The ring itself is anonymous memory (memfd) handed over a Unix
// socket (shm_handshake.h), so no name is left in /dev/shm whatever dies.
//
// Each side keeps its own cursor; the shared head/tail are only published,
// and a reader never trusts them further than the ring's capacity.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "net/byte_stream.h"
#include "net/socket.h"

namespace pyccl::net {

// The start of the shared mapping; the ring's bytes follow at kShmDataOffset.
struct ShmRingHeader {
  uint64_t magic;
  uint64_t capacity;
  alignas(64) std::atomic<uint64_t> tail;          // bytes ever written (writer publishes)
  std::atomic<uint32_t> reader_waiting;            // reader sleeps on the doorbell
  alignas(64) std::atomic<uint64_t> head;          // bytes ever read (reader publishes)
  std::atomic<uint32_t> writer_waiting;            // writer sleeps until space frees
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory atomics must be lock-free");

inline constexpr uint64_t kShmMagic = 0x474E495243434C50ull;  // "PLCCRING"
inline constexpr size_t kShmDataOffset = 4096;
inline constexpr size_t kShmMinCapacity = 64u << 10;
inline constexpr size_t kShmMaxCapacity = 1u << 30;

// One mapping of a ring (both sides map the same memfd).
class ShmRegion {
 public:
  ShmRegion() = default;
  ~ShmRegion();
  ShmRegion(ShmRegion&& o) noexcept;
  ShmRegion& operator=(ShmRegion&& o) noexcept;
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;

  // A fresh ring of `capacity` bytes in anonymous memory; `fd` is its memfd,
  // to be passed to the reader and then closed by the caller.
  static ShmRegion create(size_t capacity, int& fd);
  // Map the writer's ring; throws SocketError if it is not a valid ring.
  static ShmRegion attach(int fd);

  ShmRingHeader* header() const { return static_cast<ShmRingHeader*>(base_); }
  char* data() const { return static_cast<char*>(base_) + kShmDataOffset; }
  size_t capacity() const { return capacity_; }

 private:
  void* base_ = nullptr;
  size_t bytes_ = 0;
  size_t capacity_ = 0;
};

// Ring capacity for new links: PYCCL_SHM_RING_BYTES, default 4 MiB.
size_t shm_ring_bytes();

class ShmStream final : public ByteStream {
 public:
  enum class Role { Writer, Reader };
  // `doorbell` is the link's TCP connection. The writer's stream owns it; the
  // reader's borrows it (its fd is shut down and closed by the data plane).
  // `wait_timeout_s`: how long a reader waits for data (keepalives arrive
  // every keepalive interval); a writer waits for space without a limit.
  ShmStream(Socket doorbell, ShmRegion region, Role role, double wait_timeout_s);
  ShmStream(int borrowed_fd, ShmRegion region, Role role, double wait_timeout_s);

  void send_all(const void* data, size_t n) override;
  void sendv_all(struct iovec* iov, int iovcnt) override;
  void recv_exact(void* data, size_t n) override;
  void discard(size_t n) override;
  void shutdown_both() override;
  bool writable_now(size_t n) const override;

 private:
  void write_iov(const iovec* iov, int iovcnt);
  void publish_tail();
  void read_bytes(char* dst, size_t n);  // dst == nullptr: skip
  void sleep_until_bell();
  void ring_bell();
  void check_open() const;

  Socket owned_;
  const int fd_;
  ShmRegion region_;
  ShmRingHeader* const ring_;
  char* const data_;
  const uint64_t cap_;
  const size_t piece_;  // bytes between two publications of the cursor
  const Role role_;
  uint64_t cursor_ = 0;  // writer: tail; reader: head
  std::atomic<bool> closed_{false};
};

}  // namespace pyccl::net
