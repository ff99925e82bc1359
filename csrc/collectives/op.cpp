#include "collectives/op.h"

#include <sstream>

#include "common/log.h"

namespace pyccl {

Op::Op(OpKey key, DType dtype, RedOp redop, const void* input, void* work, RingLayout layout, int rank)
    : key_(key),
      dtype_(dtype),
      redop_(redop),
      input_(input),
      work_(work),
      layout_(std::move(layout)),
      rank_(rank),
      arrived_rs_(layout_.num_chunks(), 0),
      arrived_ag_(layout_.num_chunks(), 0) {}

net::DataHeader Op::header(net::Phase phase, uint32_t chunk) const {
  net::DataHeader h;
  h.phase = static_cast<uint8_t>(phase);
  h.dtype = static_cast<uint8_t>(dtype_);
  h.redop = static_cast<uint8_t>(redop_);
  h.epoch = key_.epoch;
  h.tag = key_.tag;
  h.seq = key_.seq;
  h.chunk = chunk;
  h.total_bytes = layout_.total_bytes();
  if (phase == net::Phase::Start) {
    h.chunk = 0;  // carries no data, only the op's identity and shape
  } else {
    h.offset = layout_.chunk(chunk).offset;
    h.length = layout_.chunk(chunk).length;
  }
  h.world_size = static_cast<uint32_t>(layout_.world_size());
  return h;
}

char* Op::begin_write(const net::DataHeader& h, const std::string& from) {
  // Disagreement about the op itself is the caller's bug on some peer, not a
  // network problem: report it as a mismatch naming both sides.
  if (h.total_bytes != layout_.total_bytes() || h.dtype != static_cast<uint8_t>(dtype_) ||
      h.redop != static_cast<uint8_t>(redop_) || h.world_size != static_cast<uint32_t>(layout_.world_size())) {
    std::ostringstream os;
    os << "all_reduce tag " << key_.tag << " #" << key_.seq << ": peers disagree: " << from << " sent "
       << h.total_bytes << " bytes of " << (valid_dtype(h.dtype) ? dtype_name(static_cast<DType>(h.dtype)) : "?")
       << " op " << (valid_redop(h.redop) ? redop_name(static_cast<RedOp>(h.redop)) : "?") << " with world size "
       << h.world_size << ", this peer has " << layout_.total_bytes() << " bytes of " << dtype_name(dtype_) << " op "
       << redop_name(redop_) << " with world size " << layout_.world_size()
       << "; every peer must pass the same size, dtype and op";
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
    return work();  // nothing is written: length 0
  }
  if (h.chunk >= layout_.num_chunks()) {
    problem = "chunk index out of range";
  } else {
    const Chunk& c = layout_.chunk(h.chunk);
    const int n = layout_.world_size();
    // Reduce-scatter never sends us our own segment; all-gather never sends
    // us the segment we own. Accepting either would overwrite live data.
    const int forbidden = phase == net::Phase::ReduceScatter ? rank_ : (rank_ + 1) % n;
    if (c.offset != h.offset || c.length != h.length) problem = "chunk offset/length do not match the layout";
    else if (static_cast<int>(c.segment) == forbidden) problem = "chunk of a segment this peer never receives in this phase";
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
  return work() + h.offset;
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
