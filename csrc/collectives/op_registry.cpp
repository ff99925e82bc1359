#include "collectives/op_registry.h"

#include <vector>

namespace pyccl {

void OpRegistry::begin_epoch(uint64_t epoch) {
  std::vector<std::shared_ptr<Op>> old;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (epoch <= epoch_) return;
    epoch_ = epoch;
    for (auto& [k, op] : ops_) old.push_back(op);
    finished_.clear();
    cv_.notify_all();
  }
  for (auto& op : old) op->fail(FailKind::Aborted, "the epoch ended");
}

void OpRegistry::abort_through(uint64_t epoch, const std::string& why) {
  std::vector<std::shared_ptr<Op>> victims;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [k, op] : ops_)
      if (op->key().epoch <= epoch) victims.push_back(op);
    cv_.notify_all();
  }
  for (auto& op : victims) op->fail(FailKind::Aborted, why);
}

void OpRegistry::fail_epoch(uint64_t epoch, FailKind kind, const std::string& why) {
  std::vector<std::shared_ptr<Op>> victims;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [k, op] : ops_)
      if (op->key().epoch == epoch) victims.push_back(op);
  }
  for (auto& op : victims) op->fail(kind, why);
}

void OpRegistry::close() {
  std::vector<std::shared_ptr<Op>> victims;
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    for (auto& [k, op] : ops_) victims.push_back(op);
    cv_.notify_all();
  }
  for (auto& op : victims) op->fail(FailKind::Aborted, "the communicator was closed");
}

Status OpRegistry::add(const std::shared_ptr<Op>& op) {
  std::lock_guard<std::mutex> lock(mu_);
  const OpKey& k = op->key();
  if (closed_) return Status::Fail(FailKind::Aborted, "the communicator was closed");
  if (k.epoch != epoch_) return Status::Fail(FailKind::Aborted, "the epoch ended before the op started");
  auto [it, inserted] = ops_.emplace(std::make_pair(k.tag, k.seq), op);
  if (!inserted) return Status::Fail(FailKind::Invalid, "an op with this tag and sequence number is already running");
  if (finished_[k.tag].contains(k.seq)) {
    ops_.erase(it);
    return Status::Fail(FailKind::Invalid, "an op with this tag and sequence number already ran in this epoch");
  }
  cv_.notify_all();
  return Status::Ok();
}

void OpRegistry::remove(const Op& op) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = ops_.find({op.key().tag, op.key().seq});
  if (it != ops_.end() && it->second.get() == &op) {
    ops_.erase(it);
    if (op.key().epoch == epoch_) finished_[op.key().tag].insert(op.key().seq);
  }
}

void OpRegistry::Finished::insert(uint64_t seq) {
  if (seq < low) return;
  above.insert(seq);
  while (!above.empty() && *above.begin() == low) {
    above.erase(above.begin());
    ++low;
  }
}

void OpRegistry::wake_all() {
  std::lock_guard<std::mutex> lock(mu_);
  cv_.notify_all();
}

}  // namespace pyccl
