// The emulator's forwarding engine: one epoll loop per worker thread.
//
// Every proxied connection is two directions; each direction is a delay
// line: bytes are read from its source socket into blocks stamped with the
// time they are due (Path::due: uplink and link rate, then the one-way
// delay), held in a FIFO, and written to the destination socket once due. A
// direction reads only while fewer than `window` bytes are in its line, so a
// full line stops reading and TCP back-pressure reaches the sender, exactly
// like a sender whose window is exhausted: one connection carries at most
// window / delay bytes per second. Sockets are edge-triggered; due times are
// kept in a min-heap and a timerfd wakes the loop at the earliest, so an
// idle emulator sleeps in epoll_wait and a busy one never polls.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <queue>
#include <thread>
#include <unordered_map>
#include <vector>

#include "linkemu/shaping.h"

namespace pyccl::linkemu {

// Counters of one proxy (one destination peer): bytes forwarded to the peer
// behind it (`down`) and back (`up`), connections open and accepted.
struct ProxyStats {
  std::atomic<uint64_t> down{0}, up{0}, active{0}, accepted{0};
};

// What a worker needs to start forwarding a freshly accepted connection.
struct NewConnection {
  int proxy = 0;        // the proxy's listening port: faults address it
  int client = -1;      // accepted socket
  int upstream = -1;    // socket connecting (non-blocking) to the peer behind the proxy
  Path down, up;        // client -> upstream, upstream -> client
  std::shared_ptr<ProxyStats> stats;
};

class Worker {
 public:
  Worker();
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void start();
  void stop();  // resets every connection and joins the thread

  // Runs `task` on the worker's thread (wakes it through an eventfd).
  void post(std::function<void()> task);
  // Same, and waits for the task to finish.
  void call(const std::function<void()>& task);

  // Listening sockets: `on_accept(fd)` runs on this worker's thread when fd is readable.
  void watch_listener(int fd, std::function<void(int)> on_accept);
  void unwatch_listener(int fd);

  // These run on the worker's thread (through post/call).
  void adopt(NewConnection nc);
  std::vector<uint64_t> connections_of(int proxy) const;
  int stall(int proxy, int64_t until_ns);  // connections stalled
  bool reset(uint64_t id);
  int reset_all(int proxy);

 private:
  struct Chunk {
    int64_t due = 0;
    std::unique_ptr<char[]> block;
    size_t len = 0, off = 0;
    bool eof = false;
  };
  struct Direction {
    int src = -1, dst = -1;
    Path path;
    uint64_t cap = 0, in_flight = 0;
    size_t max_read = 0;
    std::deque<Chunk> line;
    bool read_eof = false, done = false;
    int64_t last_due = 0, timer_due = -1;
    std::atomic<uint64_t>* counter = nullptr;
    // An unshaped direction (no delay, no rate) moves bytes with splice()
    // through this pipe instead of the line: no copy through user space.
    int pipe_r = -1, pipe_w = -1;
    uint64_t piped = 0;
  };
  struct Connection;
  struct Handle {
    enum Kind { Timer, Wake, Listener, Conn } kind;
    Connection* conn = nullptr;
    int fd = -1;
  };
  struct Connection {
    uint64_t id = 0;
    int proxy = 0;
    int client = -1, upstream = -1;
    bool connecting = true;
    bool dead = false;  // torn down; freed after the current batch of events
    int64_t stalled_until = 0;
    Direction dirs[2];
    std::shared_ptr<ProxyStats> stats;
    Handle hc{Handle::Conn}, hu{Handle::Conn};
  };

  void loop();
  void on_conn_event(Connection& c, int fd);
  void on_timer();
  bool pump(Connection& c, int which, int64_t now);  // false: the connection is gone
  bool pump_spliced(Connection& c, Direction& d);    // the same for a pipe direction
  void pump_both(Connection& c);
  void teardown(Connection& c, bool rst);
  void schedule(int64_t due_ns, uint64_t id);
  void arm_timer();
  std::unique_ptr<char[]> acquire();
  void release(std::unique_ptr<char[]> b);

  int epfd_ = -1, wakefd_ = -1, timerfd_ = -1;
  Handle timer_handle_{Handle::Timer}, wake_handle_{Handle::Wake};
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::mutex inbox_mu_;
  std::vector<std::function<void()>> inbox_;
  std::unordered_map<int, std::pair<std::unique_ptr<Handle>, std::function<void(int)>>> listeners_;
  std::unordered_map<uint64_t, std::unique_ptr<Connection>> conns_;
  std::vector<std::unique_ptr<Connection>> graveyard_;
  std::priority_queue<std::pair<int64_t, uint64_t>, std::vector<std::pair<int64_t, uint64_t>>, std::greater<>>
      timers_;
  int64_t armed_ns_ = -1;
  std::vector<std::unique_ptr<char[]>> pool_;
  static std::atomic<uint64_t> next_id_;
};

}  // namespace pyccl::linkemu
