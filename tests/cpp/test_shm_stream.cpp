// ShmStream: the shared-memory ring of same-host links, with its doorbell.
// Both ends run in this process (threads), the doorbell is a socketpair or a
// loopback TCP connection; the ring is a real memfd mapping.
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "harness.h"
#include "net/shm_handshake.h"
#include "net/shm_stream.h"
#include "net/socket.h"

using namespace pyccl::net;

namespace {

struct Pair {
  Socket a, b;
};

Pair socket_pair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
  return {Socket(fds[0]), Socket(fds[1])};
}

// A writer and a reader sharing one ring (the reader maps the writer's memfd).
struct Link {
  std::unique_ptr<ShmStream> writer, reader;
  Socket reader_sock;
};

Link make_link(size_t capacity, double reader_timeout_s) {
  Pair p = socket_pair();
  int fd = -1;
  ShmRegion w = ShmRegion::create(capacity, fd);
  ShmRegion r = ShmRegion::attach(fd);
  ::close(fd);
  Link l;
  l.reader_sock = std::move(p.b);
  l.writer = std::make_unique<ShmStream>(std::move(p.a), std::move(w), ShmStream::Role::Writer, 1.0);
  l.reader = std::make_unique<ShmStream>(l.reader_sock.fd(), std::move(r), ShmStream::Role::Reader, reader_timeout_s);
  return l;
}

std::vector<uint8_t> pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

}  // namespace

TEST(frames_of_every_size_arrive_in_order_across_wraparound) {
  // A ring smaller than the stream and than some frames: every byte passes
  // the wrap point many times, and the writer must wait for space.
  Link l = make_link(kShmMinCapacity, 5.0);
  std::vector<size_t> sizes = {1, 56, 4096, 65535, 65536, 65537, 300000, 7, 1u << 20, 3};
  std::atomic<bool> ok{true};
  std::thread writer([&] {
    uint32_t seed = 1;
    for (int round = 0; round < 4; ++round)
      for (size_t n : sizes) {
        auto v = pattern(n, seed++);
        iovec iov[2] = {{v.data(), n / 2}, {v.data() + n / 2, n - n / 2}};
        l.writer->sendv_all(iov, 2);
      }
  });
  uint32_t seed = 1;
  for (int round = 0; round < 4; ++round)
    for (size_t n : sizes) {
      std::vector<uint8_t> got(n);
      if (n == 65535) {
        l.reader->discard(n);  // a rejected frame's payload is skipped
        ++seed;
        continue;
      }
      l.reader->recv_exact(got.data(), n);
      if (got != pattern(n, seed++)) ok = false;
    }
  writer.join();
  CHECK(ok.load());
}

TEST(reader_times_out_on_a_silent_writer) {
  Link l = make_link(kShmMinCapacity, 0.2);
  char buf[8];
  const auto t0 = std::chrono::steady_clock::now();
  try {
    l.reader->recv_exact(buf, sizeof(buf));
    CHECK(false);
  } catch (const SocketError& e) {
    CHECK(e.kind() == SocketError::Kind::Timeout);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(s >= 0.15 && s < 2.0);
}

TEST(a_closed_doorbell_wakes_a_waiting_reader_and_a_waiting_writer) {
  {
    // The writer's process died: its end of the connection closes.
    Link l = make_link(kShmMinCapacity, 30.0);
    std::thread killer([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      l.writer.reset();  // closes the writer's socket, as the kernel does for a dead process
    });
    char buf[8];
    try {
      l.reader->recv_exact(buf, sizeof(buf));
      CHECK(false);
    } catch (const SocketError& e) {
      CHECK(e.kind() == SocketError::Kind::Closed);
    }
    killer.join();
  }
  {
    // The reader stopped reading (hung) and then the link is aborted: the
    // writer, blocked on a full ring, wakes.
    Link l = make_link(kShmMinCapacity, 30.0);
    std::thread aborter([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      l.writer->shutdown_both();
    });
    std::vector<uint8_t> big(4 * kShmMinCapacity);
    try {
      l.writer->send_all(big.data(), big.size());
      CHECK(false);
    } catch (const SocketError& e) {
      CHECK(e.kind() == SocketError::Kind::Closed);
    }
    aborter.join();
  }
}

TEST(a_corrupt_tail_is_an_error_not_a_wild_read) {
  Pair p = socket_pair();
  int fd = -1;
  ShmRegion w = ShmRegion::create(kShmMinCapacity, fd);
  ShmRegion r = ShmRegion::attach(fd);
  ::close(fd);
  w.header()->tail.store(kShmMinCapacity * 3);  // more than the ring holds
  ShmStream reader(p.b.fd(), std::move(r), ShmStream::Role::Reader, 1.0);
  char buf[8];
  try {
    reader.recv_exact(buf, sizeof(buf));
    CHECK(false);
  } catch (const SocketError& e) {
    CHECK_CONTAINS(std::string(e.what()), "corrupt");
  }
}

TEST(handshake_over_tcp_hands_the_ring_over) {
  Socket listener = listen_tcp("127.0.0.1", 0);
  const uint16_t port = local_port(listener);
  std::unique_ptr<ByteStream> writer;
  std::thread initiator([&] {
    Socket s = connect_tcp("127.0.0.1", port, 5.0);
    writer = initiate_shm(std::move(s), kShmMinCapacity, 5.0);
  });
  Socket accepted = accept_tcp(listener);
  std::unique_ptr<ShmStream> reader = accept_shm(accepted, 5.0, 5.0);
  initiator.join();
  CHECK(reader != nullptr);
  CHECK(dynamic_cast<ShmStream*>(writer.get()) != nullptr);
  auto v = pattern(200000, 9);
  std::thread t([&] { writer->send_all(v.data(), v.size()); });
  std::vector<uint8_t> got(v.size());
  reader->recv_exact(got.data(), got.size());
  t.join();
  CHECK(got == v);
}

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  return pyccl_test::run_all(argc, argv);
}
