// The ops this peer currently runs, by (tag, seq), for the current epoch.
//
// Readers look up the op a frame belongs to here. A frame may arrive before
// this peer has started the op (the neighbour is ahead): the reader then
// waits, which back-pressures that one connection through TCP, instead of
// buffering unbounded data. A frame for an op this peer already finished is
// stale and is dropped.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <utility>

#include "collectives/op.h"
#include "common/status.h"

namespace pyccl {

class OpRegistry {
 public:
  // Start a new epoch: fails every op of older epochs and forgets their seqs.
  void begin_epoch(uint64_t epoch);
  // Fail every op of epochs <= epoch (the master drained it).
  void abort_through(uint64_t epoch, const std::string& why);
  // Fail every registered op of `epoch` (a link of that epoch broke).
  void fail_epoch(uint64_t epoch, FailKind kind, const std::string& why);
  void close();

  Status add(const std::shared_ptr<Op>& op);
  void remove(const Op& op);

  // For reader threads: the op for (epoch, tag, seq), waiting while it is in
  // the future. Returns nullptr if it is stale, or the epoch/link ended.
  // `link_alive` is re-checked whenever the registry changes.
  template <typename AliveFn>
  std::shared_ptr<Op> wait_for(uint64_t epoch, uint32_t tag, uint64_t seq, AliveFn link_alive);

  // Wakes readers blocked in wait_for (their link closed).
  void wake_all();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t epoch_ = 0;
  bool closed_ = false;
  std::map<std::pair<uint32_t, uint64_t>, std::shared_ptr<Op>> ops_;
  // Per tag, which seqs finished in this epoch: all below `low`, plus `above`.
  // Async ops on one tag may register out of order, so a single high-water
  // mark would misjudge a late-registered op as stale.
  struct Finished {
    uint64_t low = 0;
    std::set<uint64_t> above;
    bool contains(uint64_t seq) const { return seq < low || above.count(seq) != 0; }
    void insert(uint64_t seq);
  };
  std::map<uint32_t, Finished> finished_;
};

template <typename AliveFn>
std::shared_ptr<Op> OpRegistry::wait_for(uint64_t epoch, uint32_t tag, uint64_t seq, AliveFn link_alive) {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (closed_ || epoch < epoch_ || !link_alive()) return nullptr;
    if (epoch > epoch_) {  // this peer has not switched yet: wait for it
      cv_.wait(lock);
      continue;
    }
    auto it = ops_.find({tag, seq});
    if (it != ops_.end()) return it->second;
    auto f = finished_.find(tag);
    if (f != finished_.end() && f->second.contains(seq)) return nullptr;  // finished already: stale
    cv_.wait(lock);
  }
}

}  // namespace pyccl
