// OpRegistry: ops by (tag, seq) for the current epoch, and what readers see.
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "collectives/op.h"
#include "collectives/op_registry.h"
#include "harness.h"

using namespace pyccl;

namespace {

std::shared_ptr<Op> make_op(uint64_t epoch, uint32_t tag, uint64_t seq) {
  OpParams p;
  p.key = OpKey{epoch, tag, seq};
  p.world_size = 2;
  return std::make_shared<Op>(p);
}

const auto kAlive = [] { return true; };

}  // namespace

TEST(add_then_find_then_remove) {
  OpRegistry reg;
  reg.begin_epoch(1);
  auto op = make_op(1, 7, 0);
  CHECK(reg.add(op).ok());
  CHECK(reg.wait_for(1, 7, 0, kAlive) == op);
  reg.remove(*op);
  CHECK(reg.wait_for(1, 7, 0, kAlive) == nullptr);  // finished: stale
}

TEST(duplicate_and_finished_seqs_are_refused) {
  OpRegistry reg;
  reg.begin_epoch(1);
  auto a = make_op(1, 7, 0);
  CHECK(reg.add(a).ok());
  Status dup = reg.add(make_op(1, 7, 0));
  CHECK_EQ(dup.kind, FailKind::Invalid);
  CHECK_CONTAINS(dup.message, "already running");
  reg.remove(*a);
  Status again = reg.add(make_op(1, 7, 0));
  CHECK_EQ(again.kind, FailKind::Invalid);
  CHECK_CONTAINS(again.message, "already ran in this epoch");
  CHECK(reg.add(make_op(1, 8, 0)).ok());  // another tag is independent
}

TEST(op_of_another_epoch_is_refused) {
  OpRegistry reg;
  reg.begin_epoch(2);
  Status st = reg.add(make_op(1, 0, 0));
  CHECK_EQ(st.kind, FailKind::Aborted);
  CHECK_CONTAINS(st.message, "epoch ended before the op started");
}

TEST(out_of_order_finish_keeps_earlier_seqs_live) {
  OpRegistry reg;
  reg.begin_epoch(1);
  auto s2 = make_op(1, 3, 2);
  CHECK(reg.add(s2).ok());
  reg.remove(*s2);
  CHECK(reg.wait_for(1, 3, 2, kAlive) == nullptr);
  auto s0 = make_op(1, 3, 0);  // registers late: not stale
  CHECK(reg.add(s0).ok());
  CHECK(reg.wait_for(1, 3, 0, kAlive) == s0);
}

TEST(wait_for_blocks_until_the_op_is_added) {
  OpRegistry reg;
  reg.begin_epoch(1);
  auto op = make_op(1, 5, 9);
  std::shared_ptr<Op> found;
  std::thread reader([&] { found = reg.wait_for(1, 5, 9, kAlive); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(reg.add(op).ok());
  reader.join();
  CHECK(found == op);
}

TEST(wait_for_a_future_epoch_waits_for_it) {
  OpRegistry reg;
  reg.begin_epoch(1);
  auto op = make_op(2, 0, 0);
  std::shared_ptr<Op> found;
  std::thread reader([&] { found = reg.wait_for(2, 0, 0, kAlive); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  reg.begin_epoch(2);
  CHECK(reg.add(op).ok());
  reader.join();
  CHECK(found == op);
  CHECK(reg.wait_for(1, 0, 0, kAlive) == nullptr);  // an older epoch: stale
}

TEST(wait_for_returns_when_the_link_dies) {
  OpRegistry reg;
  reg.begin_epoch(1);
  std::atomic<bool> alive{true};
  std::shared_ptr<Op> found = make_op(1, 0, 0);
  std::thread reader([&] { found = reg.wait_for(1, 0, 0, [&] { return alive.load(); }); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  alive = false;
  reg.wake_all();
  reader.join();
  CHECK(found == nullptr);
}

TEST(fail_epoch_fails_that_epochs_ops) {
  OpRegistry reg;
  reg.begin_epoch(4);
  auto a = make_op(4, 0, 0), b = make_op(4, 1, 0);
  CHECK(reg.add(a).ok());
  CHECK(reg.add(b).ok());
  reg.fail_epoch(3, FailKind::Peer, "old link");
  CHECK(!a->failed());
  reg.fail_epoch(4, FailKind::Peer, "lost connection");
  CHECK_EQ(a->status().kind, FailKind::Peer);
  CHECK_EQ(b->status().message, std::string("lost connection"));
}

TEST(new_epoch_and_abort_and_close_fail_ops) {
  OpRegistry reg;
  reg.begin_epoch(1);
  auto a = make_op(1, 0, 0);
  CHECK(reg.add(a).ok());
  reg.begin_epoch(2);
  CHECK_EQ(a->status().kind, FailKind::Aborted);
  CHECK_EQ(a->status().message, std::string("the epoch ended"));
  reg.remove(*a);  // as its driver does once it returns
  auto b = make_op(2, 0, 0);
  CHECK(reg.add(b).ok());
  reg.abort_through(2, "drained");
  CHECK_EQ(b->status().message, std::string("drained"));
  auto c = make_op(2, 1, 0);
  CHECK(reg.add(c).ok());
  reg.close();
  CHECK_EQ(c->status().kind, FailKind::Aborted);
  CHECK_EQ(reg.add(make_op(2, 2, 0)).kind, FailKind::Aborted);
  CHECK(reg.wait_for(2, 2, 0, kAlive) == nullptr);
}

TEST_MAIN()
