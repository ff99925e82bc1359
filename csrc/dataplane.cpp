#include "dataplane.h"

#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <system_error>

#include "collectives/gather_allreduce.h"
#include "net/membership_proof.h"
#include "net/wire_checks.h"
#include "net/shm_handshake.h"
#include "collectives/ring_driver.h"
#include "collectives/two_level_allreduce.h"
#include "common/log.h"
#include "state/state_wire.h"

namespace pyccl {

DataPlane::DataPlane(const std::string& host, uint16_t port, int connections)
    : connections_(std::clamp(connections, 1, static_cast<int>(net::kMaxConnections))) {
  listener_ = net::listen_tcp(host, port);
  port_ = net::local_port(listener_);
  accept_thread_ = std::thread([this] { accept_loop(); });
  PYCCL_LOG(Info, "data plane listening on " << host << ":" << port_ << " with " << connections_
                                             << " connections per neighbour");
}

DataPlane::~DataPlane() { close(); }

void DataPlane::close() {
  std::shared_ptr<net::RingLinks> links;
  std::vector<std::shared_ptr<net::RingLinks>> subs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;
    links.swap(links_);
    subs.swap(sub_);
    cv_.notify_all();
  }
  registry_.close();
  if (links) links->shutdown("the communicator was closed");
  for (auto& s : subs) s->shutdown("the communicator was closed");
  listener_.shutdown_both();
  if (accept_thread_.joinable()) accept_thread_.join();
  {
    std::lock_guard<std::mutex> lock(workers_mu_);
    for (int fd : incoming_fds_) ::shutdown(fd, SHUT_RDWR);
  }
  reap_threads(true);
  links.reset();  // joins the connector and sender threads
  subs.clear();
  listener_.close();
}

void DataPlane::set_link_timeouts(double keepalive_s, double link_timeout_s) {
  std::lock_guard<std::mutex> lock(mu_);
  keepalive_s_ = keepalive_s;
  link_timeout_s_ = link_timeout_s;
}

void DataPlane::set_epoch(const net::EpochInfo& given, const std::vector<net::EpochInfo>& sub) {
  net::EpochInfo info = given;
  {
    std::lock_guard<std::mutex> lock(mu_);
    info.keepalive_s = keepalive_s_;
    info.link_timeout_s = link_timeout_s_;
    info.source_host = source_host_;
  }
  const int k = info.connections > 0 ? std::clamp(info.connections, 1, static_cast<int>(net::kMaxConnections))
                                     : connections_;
  auto broken = [this](uint64_t epoch, const std::string& why) { on_link_broken(epoch, why); };
  auto fresh = std::make_shared<net::RingLinks>(info, k, broken);
  std::vector<std::shared_ptr<net::RingLinks>> fresh_sub;
  for (const net::EpochInfo& s : sub) {
    net::EpochInfo ring = s;
    ring.epoch = info.epoch;
    ring.my_id = info.my_id;
    ring.keepalive_s = info.keepalive_s;
    ring.link_timeout_s = info.link_timeout_s;
    ring.source_host = info.source_host;
    ring.key = info.key;
    fresh_sub.push_back(std::make_shared<net::RingLinks>(ring, k, broken));
  }
  // The registry moves first: a reader attached to the new links may look up
  // an op of the new epoch the moment the links are published.
  registry_.begin_epoch(info.epoch);
  std::shared_ptr<net::RingLinks> old;
  std::vector<std::shared_ptr<net::RingLinks>> old_sub;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    old = links_;
    if (old && info.keep_previous_key) {
      prev_epoch_ = old->epoch();
      prev_key_ = old->info().key;
    } else {
      prev_epoch_ = 0;
      prev_key_.clear();
    }
    links_ = fresh;
    old_sub.swap(sub_);
    sub_ = std::move(fresh_sub);
    cv_.notify_all();  // incoming hellos for this epoch may be waiting
  }
  if (old) old->shutdown("epoch " + std::to_string(info.epoch) + " replaced it");
  for (auto& s : old_sub) s->shutdown("epoch " + std::to_string(info.epoch) + " replaced it");
  PYCCL_LOG(Debug, "epoch " << info.epoch << ": rank " << info.rank << "/" << info.world_size << ", next peer "
                            << info.next_id << " at " << info.next_host << ":" << info.next_port << ", prev peer "
                            << info.prev_id);
  old.reset();  // joins its threads (they exit promptly after shutdown)
  old_sub.clear();
  reap_threads(false);
}

void DataPlane::abort_through(uint64_t epoch, const std::string& why) {
  std::shared_ptr<net::RingLinks> links;
  std::vector<std::shared_ptr<net::RingLinks>> subs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (links_ && links_->epoch() <= epoch) {
      links = links_;
      subs = sub_;
    }
  }
  registry_.abort_through(epoch, why);
  if (links) links->shutdown(why);
  for (auto& s : subs) s->shutdown(why);
}

void DataPlane::on_link_broken(uint64_t epoch, const std::string& reason) {
  PYCCL_LOG(Info, "epoch " << epoch << ": " << reason);
  registry_.fail_epoch(epoch, FailKind::Peer, reason);
  registry_.wake_all();
}

OpResult DataPlane::collective(Collective kind, int root, uint64_t epoch, uint32_t tag, uint64_t seq,
                               const void* input, void* work, size_t count, DType dtype, RedOp redop) {
  std::shared_ptr<net::RingLinks> links;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return {Status::Fail(FailKind::Aborted, "the communicator was closed")};
    links = links_;
  }
  if (!links || links->epoch() != epoch)
    return {Status::Fail(FailKind::Aborted, "epoch " + std::to_string(epoch) + " is no longer current")};
  const net::EpochInfo& info = links->info();
  const size_t elem = dtype_size(dtype);
  if (kind == Collective::Broadcast && (root < 0 || root >= info.world_size))
    return {Status::Fail(FailKind::Invalid, "broadcast root " + std::to_string(root) + " is not a rank of a world of " +
                                                std::to_string(info.world_size))};
  if (info.world_size == 1) {
    // Alone: every collective is a copy (all-gather: our segment is everything).
    if (work != input && count > 0) std::memmove(work, input, count * elem);
    return {};
  }
  if (kind == Collective::AllReduceQ8 && dtype != DType::Float32)
    return {Status::Fail(FailKind::Invalid, "quantized all-reduce takes float32 tensors")};
  // A small all-reduce runs as an all-gather of the n inputs, reduced
  // locally afterwards (gather_allreduce.h).
  if (kind == Collective::AllReduce && use_gather_all_reduce(count * elem, info.world_size))
    kind = Collective::AllReduceGather;
  OpParams params;
  params.key = OpKey{epoch, tag, seq};
  params.collective = kind;
  params.root = root;
  params.dtype = dtype;
  params.redop = redop;
  params.input = input;
  params.work = work;
  params.count = count;
  params.rank = info.rank;
  params.world_size = info.world_size;
  return run_op(*links, params);
}

OpResult DataPlane::all_reduce_two_level(uint64_t epoch, uint32_t tag, uint64_t seq, const void* input, void* work,
                                         size_t count, DType dtype, RedOp redop) {
  std::shared_ptr<net::RingLinks> main;
  std::vector<std::shared_ptr<net::RingLinks>> subs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return {Status::Fail(FailKind::Aborted, "the communicator was closed")};
    main = links_;
    subs = sub_;
  }
  if (!main || main->epoch() != epoch)
    return {Status::Fail(FailKind::Aborted, "epoch " + std::to_string(epoch) + " is no longer current")};
  if (subs.size() != 2)
    return {Status::Fail(FailKind::Invalid, "epoch " + std::to_string(epoch) + " has no two-level rings")};
  OpParams params;
  params.key = OpKey{epoch, tag, seq};
  params.dtype = dtype;
  params.redop = redop;
  params.input = input;
  params.work = work;
  params.count = count;
  TwoLevelGeometry g;
  g.region_rank = subs[0]->info().rank;
  g.region_size = subs[0]->info().world_size;
  g.cross_rank = subs[1]->info().rank;
  g.cross_size = subs[1]->info().world_size;
  SubOpResult r = two_level_all_reduce(params, g, [&](SubRing ring, const OpParams& q) {
    OpResult o = run_op(*subs[ring == SubRing::Region ? 0 : 1], q);
    return SubOpResult{o.status, o.tx_bytes, o.rx_bytes};
  });
  return {r.status, r.tx_bytes, r.rx_bytes};
}

OpResult DataPlane::run_op(net::RingLinks& links, const OpParams& params) {
  if (params.world_size == 1) {
    // A ring of one (a region of one peer, or one region): the result is
    // the input, laid out as the collective lays it out.
    const size_t bytes = params.count * dtype_size(params.dtype);
    if (params.work != params.input && bytes > 0) std::memmove(params.work, params.input, bytes);
    return {};
  }
  auto op = std::make_shared<Op>(params);
  Status st = links.wait_ready();
  if (!st.ok()) return {st};
  bool published = false;
  st = run_ring(op, links, [&] {
    Status s = registry_.add(op);
    published = s.ok();
    return s;
  });
  if (!st.ok()) op->fail(st.kind, st.message);
  // Never return while a sender still reads from, or a reader still writes
  // into, the caller's buffers.
  op->wait_quiescent();
  if (published) registry_.remove(*op);
  return {op->status(), op->tx_bytes(), op->rx_bytes()};
}

// ----------------------------------------------------------------- incoming

void DataPlane::accept_loop() {
  // Each connection gets its own thread (blocking I/O); finished ones are
  // joined here on every accept, and the number of live ones is capped, so
  // a port scan or a flood of junk connections cannot exhaust threads,
  // memory maps or file descriptors.
  constexpr size_t kMaxConnections = 1024;
  for (;;) {
    net::Socket s = net::accept_tcp(listener_);
    if (!s.valid()) return;
    reap_threads(false);
    std::lock_guard<std::mutex> lock(workers_mu_);
    if (closed_) return;
    if (workers_.size() >= kMaxConnections) {
      PYCCL_LOG(Warning, "rejected data connection from " << s.peer_name() << ": " << workers_.size()
                                                         << " connections already open");
      continue;
    }
    auto done = std::make_shared<std::atomic<bool>>(false);
    int fd = s.fd();
    try {
      std::thread t([this, sock = std::move(s), done, fd]() mutable {
        serve_incoming(sock);
        {
          std::lock_guard<std::mutex> l(workers_mu_);
          incoming_fds_.remove(fd);
        }
        // Closed only once close() can no longer see the number: a closed fd
        // is reused at once, and shutting down a stale number would cut
        // whatever socket this process opened next (the master link, say).
        sock.close();
        done->store(true);
      });
      incoming_fds_.push_back(fd);
      workers_.push_back(Worker{std::move(t), done});
    } catch (const std::system_error& e) {
      PYCCL_LOG(Error, "cannot serve a data connection: " << e.what());
    }
  }
}

void DataPlane::set_hello_wait(double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  hello_wait_s_ = seconds;
}

void DataPlane::set_authenticate(bool on) {
  std::lock_guard<std::mutex> lock(mu_);
  authenticate_ = on;
}

int DataPlane::link_connections() {
  std::lock_guard<std::mutex> lock(mu_);
  return links_ ? links_->connections() : 0;
}

void DataPlane::set_source_host(const std::string& host) {
  std::lock_guard<std::mutex> lock(mu_);
  source_host_ = host;
}

net::ProbeReport DataPlane::probe(const std::string& host, uint16_t port, int connections, int pings, double seconds,
                                  uint64_t max_bytes, double timeout_s) {
  net::ProbeOptions opt;
  opt.timeout_s = timeout_s;
  opt.host = host;
  opt.port = port;
  opt.connections = connections;
  opt.pings = pings;
  opt.seconds = seconds;
  opt.max_bytes = max_bytes;
  {
    std::lock_guard<std::mutex> lock(mu_);
    opt.source_host = source_host_;
    if (links_) {
      opt.epoch = links_->epoch();
      opt.my_id = links_->info().my_id;
      opt.key = links_->info().key;
    }
  }
  return net::probe_path(opt);
}

std::string DataPlane::key_of(uint64_t epoch) {
  std::lock_guard<std::mutex> lock(mu_);
  if (links_ && links_->epoch() == epoch) return links_->info().key;
  if (epoch != 0 && epoch == prev_epoch_) return prev_key_;
  return {};
}

void DataPlane::refuse(const std::string& addr, const std::string& why) {
  // Once per source host: a scanner or an intruder must not flood the log.
  const std::string host = addr.substr(0, addr.rfind(':'));
  bool first;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (refused_from_.size() >= 4096) refused_from_.clear();
    first = refused_from_.insert(host).second;
  }
  if (first) PYCCL_LOG(Warning, "refused data connection from " << addr << ": " << why
                                                               << " (further refusals from it are not logged)");
}

uint64_t DataPlane::current_epoch() {
  std::lock_guard<std::mutex> lock(mu_);
  return links_ ? links_->epoch() : 0;
}

std::shared_ptr<net::RingLinks> DataPlane::links_for(uint64_t epoch, double timeout_s, uint8_t ring) {
  // A neighbour that learned the new epoch first may connect before we have
  // it: hold its hello until our epoch catches up (or moves past it).
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, std::chrono::duration<double>(timeout_s),
               [&] { return closed_ || (links_ && links_->epoch() >= epoch); });
  if (closed_ || !links_ || links_->epoch() != epoch) return nullptr;
  if (ring == 0) return links_;
  return ring <= sub_.size() ? sub_[ring - 1] : nullptr;
}

void DataPlane::serve_incoming(net::Socket& sock) {
  const std::string addr = sock.peer_name();
  // Both kinds of opening frame are 40 bytes; the magic tells them apart.
  static_assert(sizeof(net::LinkHello) == sizeof(state::StateRequest), "opening frames differ in size");
  net::LinkHello hello;
  uint8_t proof[net::kProofBytes] = {};
  net::Nonce nonce{};
  bool authenticate;
  {
    std::lock_guard<std::mutex> lock(mu_);
    authenticate = authenticate_;
  }
  try {
    sock.set_recv_timeout(10.0);
    if (authenticate) nonce = net::send_challenge(sock);
    sock.recv_exact(&hello, sizeof(hello));
    if (authenticate) sock.recv_exact(proof, sizeof(proof));
  } catch (const net::SocketError& e) {
    PYCCL_LOG(Warning, "rejected data connection from " << addr << ": no valid hello (" << e.what() << ")");
    return;
  }
  if (hello.magic == state::kRequestMagic) {
    state::StateRequest req;
    std::memcpy(static_cast<void*>(&req), &hello, sizeof(req));
    // A fetch names the epoch it was planned in (the current or the previous one).
    if (authenticate && !net::proof_ok(key_of(req.reserved), nonce, &hello, sizeof(hello), proof)) {
      refuse(addr, "a state request without a valid proof of membership of epoch " + std::to_string(req.reserved));
      return;
    }
    state_server_.serve(sock, req);
    return;
  }
  if (hello.magic == net::kProbeMagic) {
    net::ProbeRequest req;
    std::memcpy(static_cast<void*>(&req), &hello, sizeof(req));
    if (authenticate && !net::proof_ok(key_of(req.epoch), nonce, &hello, sizeof(hello), proof)) {
      refuse(addr, "a link probe without a valid proof of membership of epoch " + std::to_string(req.epoch));
      return;
    }
    try {
      serve_probe(sock, req);
    } catch (const net::SocketError& e) {
      PYCCL_LOG(Info, "link probe from " << addr << " ended early: " << e.what());
    }
    return;
  }
  if (const std::string bad = net::link_hello_problem(hello); !bad.empty()) {
    PYCCL_LOG(Warning, "rejected data connection from " << addr << ": malformed hello (" << bad << ")");
    return;
  }
  // A neighbour may learn of a new epoch before we do, but not of several
  // (each needs our vote, or our expulsion), so a hello for an epoch further
  // ahead is a guess: closed at once rather than holding a thread while we
  // wait for an epoch that may never come. A peer that has no epoch yet (a
  // joiner) cannot tell, and waits as before.
  constexpr uint64_t kEpochLead = 2;
  const uint64_t current = current_epoch();
  if (current != 0 && hello.epoch > current + kEpochLead) {
    refuse(addr, "a ring link for epoch " + std::to_string(hello.epoch) + ", which is not near the current " +
                     std::to_string(current));
    return;
  }
  double wait_s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    wait_s = hello_wait_s_;
  }
  auto links = links_for(hello.epoch, wait_s, hello.ring);
  std::string why;
  if (!links && hello.ring != 0 && current_epoch() == hello.epoch) {
    PYCCL_LOG(Warning, "rejected data connection from " << addr << ": epoch " << hello.epoch << " has no ring "
                                                        << static_cast<int>(hello.ring));
    return;
  }
  if (!links) {
    // An older epoch is ordinary churn (the neighbour had not yet heard of
    // the newer one); a newer one that never arrived is worth a warning.
    if (current_epoch() > hello.epoch)
      PYCCL_LOG(Info, "ignored data connection from " << addr << " for superseded epoch " << hello.epoch);
    else
      PYCCL_LOG(Warning, "rejected data connection from " << addr << ": epoch " << hello.epoch << " is not current");
    return;
  }
  if (authenticate && !net::proof_ok(links->info().key, nonce, &hello, sizeof(hello), proof)) {
    refuse(addr, "a ring link without a valid proof of membership of epoch " + std::to_string(hello.epoch));
    return;
  }
  // Same host: the bytes move through a ring in shared memory, this
  // connection stays as its doorbell and liveness channel (shm_stream.h).
  std::unique_ptr<net::ShmStream> shm;
  if ((hello.reserved[0] & net::kLinkWantsShm) != 0) {
    try {
      shm = net::accept_shm(sock, 10.0, links->info().link_timeout_s);
    } catch (const net::SocketError& e) {
      PYCCL_LOG(Warning, "rejected data connection from " << addr << ": no shared-memory ring (" << e.what() << ")");
      return;
    }
  }
  if (!links->attach_incoming(sock, hello, why)) {
    if (links->broken())  // the epoch ended while the hello waited: churn, not an attack
      PYCCL_LOG(Info, "ignored data connection from " << addr << ": " << why);
    else
      PYCCL_LOG(Warning, "rejected data connection from " << addr << ": " << why);
    return;
  }
  const std::string from = "peer " + std::to_string(hello.from_peer) + " (" + addr + ")";
  // The sender writes keepalives on an idle link, so silence this long means
  // the path stalled or the neighbour hung.
  sock.set_recv_timeout(links->info().link_timeout_s);
  sock.tune_for_bulk();
  if (shm) {
    ++shm_links_accepted_;
    PYCCL_LOG(Debug, "ring link from " << from << " carries its bytes through shared memory");
  }
  net::ByteStream& stream = shm ? static_cast<net::ByteStream&>(*shm) : sock;
  try {
    read_frames(stream, *links, from);
  } catch (const net::SocketError& e) {
    if (!links->broken()) {
      const std::string what = e.what();
      std::string reason = e.kind() == net::SocketError::Kind::Timeout
                               ? "no data from " + from + " for " + std::to_string(links->info().link_timeout_s) +
                                     " s: the link went silent"
                               : "lost connection from " + from + " (" + what + ")";
      on_link_broken(links->epoch(), reason);
      links->shutdown(reason);
    }
  }
  links->detach_incoming(sock);
}

void DataPlane::read_frames(net::ByteStream& sock, net::RingLinks& links, const std::string& from) {
  const uint64_t epoch = links.epoch();
  for (;;) {
    net::DataHeader h;
    sock.recv_exact(&h, sizeof(h));
    const std::string bad = net::data_header_problem(h, epoch);
    if (bad.empty() && net::is_keepalive(h)) continue;
    if (!bad.empty()) {
      std::string reason = "protocol error from " + from + ": " + bad + "; closing the connection";
      PYCCL_LOG(Warning, "rejected frame: " << reason);
      registry_.fail_epoch(epoch, FailKind::Protocol, reason);
      links.shutdown(reason);
      return;
    }
    auto op = registry_.wait_for(epoch, h.tag, h.seq, [&] { return !links.broken(); });
    char* dest = op ? op->begin_write(h, from) : nullptr;
    if (dest == nullptr) {
      if (links.broken()) return;
      PYCCL_LOG(Debug, "dropping " << h.length << " bytes from " << from << " for op tag " << h.tag << " seq "
                                   << h.seq << (op ? " (rejected by the op)" : " (op not running)"));
      sock.discard(h.length);
      continue;
    }
    try {
      sock.recv_exact(dest, h.length);
    } catch (...) {
      op->end_write(h, false);
      throw;
    }
    op->end_write(h, true);
  }
}

void DataPlane::reap_threads(bool all) {
  std::list<Worker> finished;
  {
    std::lock_guard<std::mutex> lock(workers_mu_);
    for (auto it = workers_.begin(); it != workers_.end();) {
      if (all || it->done->load()) {
        finished.splice(finished.end(), workers_, it++);
      } else {
        ++it;
      }
    }
  }
  for (auto& w : finished) w.thread.join();
}

}  // namespace pyccl
