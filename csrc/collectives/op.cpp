#include "collectives/op.h"

#include <sstream>

#include "common/log.h"
#include "kernels/quantize.h"

namespace pyccl {

namespace {
// Where a start frame's zero payload bytes "go". begin_write returns null to
// reject a frame, so it must never return the work buffer for a start frame:
// an op over an empty tensor may have a null work buffer (torch hands out
// data_ptr() == 0 for zero elements), and the frame would be dropped.
char start_frame_sink = 0;
}  // namespace

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::AllReduce: return "all_reduce";
    case Collective::ReduceScatter: return "reduce_scatter";
    case Collective::AllGather: return "all_gather";
    case Collective::Broadcast: return "broadcast";
    case Collective::AllReduceQ8: return "all_reduce(quantize=uint8)";
    case Collective::AllReduceGather: return "all_reduce";
  }
  return "?";
}

uint64_t call_bytes(Collective c, uint64_t total_bytes, uint32_t world_size) {
  return c == Collective::AllReduceGather && world_size > 0 ? total_bytes / world_size : total_bytes;
}

Op::Op(OpKey key, RingShape shape, DType dtype, RedOp redop, const void* input, void* work, RingLayout layout, int rank,
       int world_size)
    : key_(key),
      shape_(shape),
      dtype_(dtype),
      redop_(redop),
      input_(input),
      work_(work),
      layout_(std::move(layout)),
      rank_(rank),
      world_size_(world_size),
      arrived_rs_(layout_.num_chunks(), 0),
      arrived_ag_(layout_.num_chunks(), 0) {
  if (quantized()) {
    const size_t bytes = layout_.total_bytes() / layout_.elem_size() + kQuantHeaderBytes * layout_.num_chunks();
    q_rs_.resize(bytes);
    q_ag_.resize(bytes);
    q_send_.resize(bytes);
  }
}

size_t Op::q_offset(uint32_t chunk) const {
  return layout_.chunk(chunk).offset / layout_.elem_size() + kQuantHeaderBytes * chunk;
}

uint32_t Op::wire_length(uint32_t chunk) const {
  const uint32_t len = layout_.chunk(chunk).length;
  return quantized() ? static_cast<uint32_t>(quantized_bytes(len / layout_.elem_size())) : len;
}

uint8_t* Op::q_recv(net::Phase phase, uint32_t chunk) {
  return (phase == net::Phase::ReduceScatter ? q_rs_.data() : q_ag_.data()) + q_offset(chunk);
}

uint8_t* Op::q_send(uint32_t chunk) { return q_send_.data() + q_offset(chunk); }

uint8_t Op::op_byte() const {
  return static_cast<uint8_t>(static_cast<uint8_t>(redop_) | (static_cast<uint8_t>(shape_.collective) << 4));
}

int Op::segment_received(net::Phase phase, int step) const {
  const int n = world_size_;
  const int base = rank_ + shape_.owner_offset + (phase == net::Phase::ReduceScatter ? -2 : -1);
  return ((base - step) % n + n) % n;
}

int Op::step_of(net::Phase phase, int segment) const {
  const int n = world_size_;
  const int base = rank_ + shape_.owner_offset + (phase == net::Phase::ReduceScatter ? -2 : -1);
  return ((base - segment) % n + n) % n;
}

bool Op::may_receive(net::Phase phase, int segment) const {
  const int n = world_size_;
  switch (shape_.collective) {
    case Collective::Broadcast:
      return phase == net::Phase::AllGather && rank_ != shape_.root;
    case Collective::ReduceScatter:
      if (phase != net::Phase::ReduceScatter) return false;
      break;
    case Collective::AllGather:
    case Collective::AllReduceGather:
      if (phase != net::Phase::AllGather) return false;
      break;
    case Collective::AllReduce:
    case Collective::AllReduceQ8:
      break;
  }
  // Reduce-scatter never brings back the segment we sent first; all-gather
  // never brings the segment we own. Accepting either would overwrite live data.
  const int own = ((rank_ + shape_.owner_offset) % n + n) % n;
  const int forbidden = phase == net::Phase::ReduceScatter ? (own - 1 + n) % n : own;
  return segment != forbidden;
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
    h.length = wire_length(chunk);
  }
  h.world_size = static_cast<uint32_t>(world_size_);
  return h;
}

char* Op::begin_write(const net::DataHeader& h, const std::string& from) {
  // Disagreement about the op itself is the caller's bug on some peer, not a
  // network problem: report it as a mismatch naming both sides.
  if (h.total_bytes != layout_.total_bytes() || h.dtype != static_cast<uint8_t>(dtype_) || h.redop != op_byte() ||
      h.world_size != static_cast<uint32_t>(world_size_)) {
    const uint8_t their_op = h.redop & 0xF, their_coll = h.redop >> 4;
    std::ostringstream os;
    os << collective_name(shape_.collective) << " tag " << key_.tag << " #" << key_.seq << ": peers disagree: "
       << from << " called " << (their_coll <= 5 ? collective_name(static_cast<Collective>(their_coll)) : "?")
       << " with "
       << (their_coll <= 5 ? call_bytes(static_cast<Collective>(their_coll), h.total_bytes, h.world_size)
                           : h.total_bytes)
       << " bytes of "
       << (valid_dtype(h.dtype) ? dtype_name(static_cast<DType>(h.dtype)) : "?") << " op "
       << (valid_redop(their_op) ? redop_name(static_cast<RedOp>(their_op)) : "?") << " in a world of "
       << h.world_size << ", this peer called " << collective_name(shape_.collective) << " with "
       << call_bytes(shape_.collective, layout_.total_bytes(), static_cast<uint32_t>(world_size_)) << " bytes of " << dtype_name(dtype_) << " op " << redop_name(redop_)
       << " in a world of " << world_size_ << "; every peer must make the same call (collective, size, dtype, op)";
    fail(FailKind::Mismatch, os.str());
    return nullptr;
  }
  const net::Phase phase = static_cast<net::Phase>(h.phase);
  std::string problem;
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
  if (h.chunk >= layout_.num_chunks()) {
    problem = "chunk index out of range";
  } else {
    const Chunk& c = layout_.chunk(h.chunk);
    if (c.offset != h.offset || wire_length(h.chunk) != h.length) problem = "chunk offset/length do not match the layout";
    else if (!may_receive(phase, static_cast<int>(c.segment)))
      problem = "chunk of a segment this peer never receives in this phase";
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (problem.empty() && arrived(phase)[h.chunk]) problem = "chunk received twice";
  if (!problem.empty()) {
    lock.unlock();
    fail(FailKind::Protocol, "bad data frame from " + from + ": " + problem);
    return nullptr;
  }
  if (!status_.ok()) return nullptr;
  ++active_writers_;
  return quantized() ? reinterpret_cast<char*>(q_recv(phase, h.chunk)) : work() + h.offset;
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
      run_handler = status_.ok() && on_arrival_;
    }
  }
  if (run_handler) on_arrival_(phase, h.chunk);  // outside mu_: it sends, which may fail the op
  std::lock_guard<std::mutex> lock(mu_);
  --active_writers_;
  if (ok) ++processed_;
  cv_.notify_all();
}

bool Op::wait_processed(size_t count) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return processed_ >= count || !status_.ok(); });
  return status_.ok();
}

void Op::add_pending_send() {
  std::lock_guard<std::mutex> lock(mu_);
  ++pending_sends_;
}

void Op::send_done(bool ok, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  --pending_sends_;
  if (ok) tx_bytes_ += bytes;
  cv_.notify_all();
}

void Op::wait_quiescent() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return active_writers_ == 0 && pending_sends_ == 0; });
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
