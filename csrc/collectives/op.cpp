#include "collectives/op.h"

#include <sstream>

#include "common/log.h"

namespace pyccl {

namespace {
// Where a start frame's zero payload bytes "go". begin_write returns null to
// reject a frame, so it must never return the work buffer for a start frame:
// an op over an empty tensor may have a null work buffer (torch hands out
// data_ptr() == 0 for zero elements), and the frame would be dropped.
char start_frame_sink = 0;

RingLayout layout_for(const CollectiveSpec& spec, const OpParams& p) {
  const size_t n = static_cast<size_t>(p.world_size);
  return RingLayout(spec.one_input_per_peer ? p.count * n : p.count, dtype_size(p.dtype),
                    spec.one_segment ? 1 : p.world_size);
}
}  // namespace

Op::Op(const OpParams& p)
    : key_(p.key),
      spec_(collective_spec(p.collective)),
      root_(p.root),
      dtype_(p.dtype),
      redop_(p.redop),
      input_(p.input),
      work_(p.work),
      layout_(layout_for(spec_, p)),
      rank_(p.rank),
      world_size_(p.world_size),
      arrived_rs_(layout_.num_chunks(), 0),
      arrived_ag_(layout_.num_chunks(), 0) {
  plan_ = spec_.make_plan(*this);
}

Op::~Op() = default;

uint8_t Op::op_byte() const {
  return static_cast<uint8_t>(static_cast<uint8_t>(redop_) | (static_cast<uint8_t>(spec_.code) << 4));
}

net::DataHeader Op::header(net::Phase phase, uint32_t chunk) const {
  net::DataHeader h;
  h.phase = static_cast<uint8_t>(phase);
  h.dtype = static_cast<uint8_t>(dtype_);
  h.redop = op_byte();
  h.epoch = key_.epoch;
  h.tag = key_.tag;
  h.seq = key_.seq;
  h.chunk = chunk;
  h.total_bytes = layout_.total_bytes();
  if (phase == net::Phase::Start) {
    h.chunk = 0;  // carries no data, only the op's identity and shape
  } else {
    h.offset = layout_.chunk(chunk).offset;
    h.length = plan_->wire_length(chunk);
  }
  h.world_size = static_cast<uint32_t>(world_size_);
  return h;
}

void Op::send(net::Phase phase, uint32_t chunk, const void* payload) {
  if (sender_ == nullptr) {
    fail(FailKind::Invalid, "an op sent a frame before it was started");
    return;
  }
  sender_->send(shared_from_this(), header(phase, chunk), payload);
}

std::string Op::mismatch_message(const net::DataHeader& h, const std::string& from) const {
  const uint8_t their_op = h.redop & 0xF;
  const CollectiveSpec* theirs = find_collective(h.redop >> 4);
  std::ostringstream os;
  os << spec_.name << " tag " << key_.tag << " #" << key_.seq << ": peers disagree: " << from << " called "
     << (theirs ? theirs->name : "?") << " with "
     << (theirs ? call_bytes(*theirs, h.total_bytes, h.world_size) : h.total_bytes)
     << " bytes of " << (valid_dtype(h.dtype) ? dtype_name(static_cast<DType>(h.dtype)) : "?") << " op "
     << (valid_redop(their_op) ? redop_name(static_cast<RedOp>(their_op)) : "?") << " in a world of " << h.world_size
     << ", this peer called " << spec_.name << " with "
     << call_bytes(spec_, layout_.total_bytes(), static_cast<uint32_t>(world_size_)) << " bytes of "
     << dtype_name(dtype_) << " op " << redop_name(redop_) << " in a world of " << world_size_
     << "; every peer must make the same call (collective, size, dtype, op)";
  return os.str();
}

std::string Op::frame_problem(const net::DataHeader& h) const {
  if (h.chunk >= layout_.num_chunks()) return "chunk index out of range";
  const Chunk& c = layout_.chunk(h.chunk);
  if (c.offset != h.offset || plan_->wire_length(h.chunk) != h.length)
    return "chunk offset/length do not match the layout";
  if (!plan_->receives(static_cast<net::Phase>(h.phase), static_cast<int>(c.segment)))
    return "chunk of a segment this peer never receives in this phase";
  return {};
}

char* Op::begin_write(const net::DataHeader& h, const std::string& from) {
  // Disagreement about the op itself is the caller's bug on some peer, not a
  // network problem: report it as a mismatch naming both sides.
  if (h.total_bytes != layout_.total_bytes() || h.dtype != static_cast<uint8_t>(dtype_) || h.redop != op_byte() ||
      h.world_size != static_cast<uint32_t>(world_size_)) {
    fail(FailKind::Mismatch, mismatch_message(h, from));
    return nullptr;
  }
  const net::Phase phase = static_cast<net::Phase>(h.phase);
  if (phase == net::Phase::Start) {
    std::unique_lock<std::mutex> lock(mu_);
    if (start_arrived_ || h.length != 0) {
      lock.unlock();
      fail(FailKind::Protocol, "bad data frame from " + from + ": duplicate or non-empty start frame");
      return nullptr;
    }
    if (!status_.ok()) return nullptr;
    ++active_writers_;
    return &start_frame_sink;  // nothing is written: length 0
  }
  std::string problem = frame_problem(h);
  std::unique_lock<std::mutex> lock(mu_);
  if (problem.empty() && arrived(phase)[h.chunk]) problem = "chunk received twice";
  if (!problem.empty()) {
    lock.unlock();
    fail(FailKind::Protocol, "bad data frame from " + from + ": " + problem);
    return nullptr;
  }
  if (!status_.ok()) return nullptr;
  ++active_writers_;
  return plan_->landing(phase, h.chunk);
}

void Op::end_write(const net::DataHeader& h, bool ok) {
  const auto phase = static_cast<net::Phase>(h.phase);
  bool run_handler = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ok && phase == net::Phase::Start) {
      start_arrived_ = true;
    } else if (ok) {
      arrived(phase)[h.chunk] = 1;
      rx_bytes_ += h.length;
      run_handler = status_.ok();
    }
  }
  if (run_handler) plan_->on_arrival(phase, h.chunk);  // outside mu_: it sends, which may fail the op
  std::lock_guard<std::mutex> lock(mu_);
  --active_writers_;
  if (ok) ++processed_;
  notify_if_due();
}

void Op::notify_if_due() {
  if (processed_ >= wait_target_ || (quiet_waiters_ > 0 && active_writers_ == 0 && pending_sends_ == 0)) cv_.notify_all();
}

bool Op::wait_processed(size_t count) {
  std::unique_lock<std::mutex> lock(mu_);
  wait_target_ = count;
  cv_.wait(lock, [&] { return processed_ >= count || !status_.ok(); });
  wait_target_ = SIZE_MAX;
  return status_.ok();
}

size_t Op::processed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return processed_;
}

void Op::add_pending_send() {
  std::lock_guard<std::mutex> lock(mu_);
  ++pending_sends_;
}

void Op::send_done(bool ok, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  --pending_sends_;
  if (ok) tx_bytes_ += bytes;
  notify_if_due();
}

void Op::wait_quiescent() {
  std::unique_lock<std::mutex> lock(mu_);
  ++quiet_waiters_;
  cv_.wait(lock, [&] { return active_writers_ == 0 && pending_sends_ == 0; });
  --quiet_waiters_;
}

void Op::fail(FailKind kind, const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!status_.ok()) return;
  status_ = Status::Fail(kind, message);
  PYCCL_LOG(Debug, "op epoch " << key_.epoch << " tag " << key_.tag << " seq " << key_.seq << " failed ("
                               << fail_kind_name(kind) << "): " << message);
  cv_.notify_all();
}

Status Op::status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return status_;
}

bool Op::failed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !status_.ok();
}

uint64_t Op::tx_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tx_bytes_;
}

uint64_t Op::rx_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return rx_bytes_;
}

}  // namespace pyccl
