// Op: frame headers, and validation of incoming frames (begin_write).
#include <memory>
#include <string>
#include <vector>

#include "collectives/op.h"
#include "harness.h"
#include "kernels/quantize.h"

using namespace pyccl;
using net::Phase;

namespace {

// Takes frames and forgets them (writes "complete" at once).
struct NullSender : net::FrameSender {
  std::vector<net::DataHeader> sent;
  void send(const std::shared_ptr<net::FrameSource>& src, const net::DataHeader& h, const void*) override {
    src->add_pending_send();
    sent.push_back(h);
    src->send_done(true, h.length);
  }
};

// An all-reduce of 30 float32 in a world of 3: one chunk (40 bytes) per
// segment, chunk c in segment c. Rank 1 sends segment 1 first and owns 2.
struct Fixture {
  std::vector<float> in = std::vector<float>(30, 1.0f), out = std::vector<float>(30, 0.0f);
  NullSender sender;
  std::shared_ptr<Op> op;  // rank 1
  std::shared_ptr<Op> peer;  // rank 0, its predecessor: makes valid headers

  explicit Fixture(Collective c = Collective::AllReduce, size_t count = 30) {
    OpParams p;
    p.key = OpKey{1, 7, 3};
    p.collective = c;
    p.input = in.data();
    p.work = out.data();
    p.count = count;
    p.world_size = 3;
    p.rank = 1;
    op = std::make_shared<Op>(p);
    op->set_sender(&sender);
    p.rank = 0;
    peer = std::make_shared<Op>(p);
  }
  char* write(const net::DataHeader& h) { return op->begin_write(h, "peer 9 (10.0.0.9:1)"); }
  // Delivers a valid frame whole.
  bool deliver(const net::DataHeader& h) {
    char* dst = write(h);
    if (dst) op->end_write(h, true);
    return dst != nullptr;
  }
};

void check_protocol_error(Fixture& f, const net::DataHeader& h, const std::string& what) {
  CHECK(f.write(h) == nullptr);
  CHECK_EQ(f.op->status().kind, FailKind::Protocol);
  CHECK_CONTAINS(f.op->status().message, "bad data frame from peer 9 (10.0.0.9:1): " + what);
}

void check_mismatch(const net::DataHeader& h) {
  Fixture f;
  CHECK(f.write(h) == nullptr);
  CHECK_EQ(f.op->status().kind, FailKind::Mismatch);
  CHECK_CONTAINS(f.op->status().message, "all_reduce tag 7 #3: peers disagree: peer 9 (10.0.0.9:1) called ");
  CHECK_CONTAINS(f.op->status().message, "; every peer must make the same call (collective, size, dtype, op)");
}

}  // namespace

TEST(header_carries_the_ops_identity) {
  Fixture f;
  net::DataHeader h = f.op->header(Phase::ReduceScatter, 2);
  CHECK_EQ(h.magic, net::kDataMagic);
  CHECK_EQ(h.phase, static_cast<uint8_t>(Phase::ReduceScatter));
  CHECK_EQ(h.dtype, static_cast<uint8_t>(DType::Float32));
  CHECK_EQ(h.redop, static_cast<uint8_t>(RedOp::Sum));  // all-reduce is code 0
  CHECK_EQ(h.epoch, 1u);
  CHECK_EQ(h.tag, 7u);
  CHECK_EQ(h.seq, 3u);
  CHECK_EQ(h.chunk, 2u);
  CHECK_EQ(h.total_bytes, 120u);
  CHECK_EQ(h.offset, 80u);
  CHECK_EQ(h.length, 40u);
  CHECK_EQ(h.world_size, 3u);
  net::DataHeader s = f.op->header(Phase::Start, 5);
  CHECK_EQ(s.chunk, 0u);
  CHECK_EQ(s.offset, 0u);
  CHECK_EQ(s.length, 0u);
  Fixture g(Collective::Broadcast);
  CHECK_EQ(g.op->header(Phase::AllGather, 0).redop, static_cast<uint8_t>(0x31));
}

TEST(quantized_frames_carry_codes) {
  Fixture f(Collective::AllReduceQ8);
  net::DataHeader h = f.peer->header(Phase::ReduceScatter, 0);
  CHECK_EQ(h.length, static_cast<uint32_t>(quantized_bytes(10)));
  CHECK_EQ(h.offset, 0u);
  CHECK(f.write(h) != nullptr);
  CHECK(f.write(h) != reinterpret_cast<char*>(f.out.data()));  // staging, not the work buffer
  Fixture g(Collective::AllReduceQ8);
  h.length = 40;  // raw float32 bytes: wrong for this op
  check_protocol_error(g, h, "chunk offset/length do not match the layout");
}

TEST(valid_frames_land_in_the_work_buffer) {
  Fixture f;
  char* base = reinterpret_cast<char*>(f.out.data());
  CHECK(f.write(f.peer->header(Phase::ReduceScatter, 0)) == base);
  CHECK(f.write(f.peer->header(Phase::ReduceScatter, 2)) == base + 80);
  CHECK(f.write(f.peer->header(Phase::AllGather, 1)) == base + 40);
  CHECK(!f.op->failed());
}

TEST(mismatched_size_dtype_op_collective_world) {
  Fixture f;
  net::DataHeader h = f.peer->header(Phase::ReduceScatter, 0);
  net::DataHeader t = h;
  t.total_bytes = 124;
  check_mismatch(t);
  t = h;
  t.dtype = static_cast<uint8_t>(DType::Int32);
  check_mismatch(t);
  t = h;
  t.redop = static_cast<uint8_t>(RedOp::Max);
  check_mismatch(t);
  t = h;
  t.redop = static_cast<uint8_t>(RedOp::Sum) | (static_cast<uint8_t>(Collective::AllGather) << 4);
  check_mismatch(t);
  t = h;
  t.world_size = 4;
  check_mismatch(t);
}

TEST(mismatch_message_names_both_calls) {
  Fixture f;
  net::DataHeader h = f.peer->header(Phase::ReduceScatter, 0);
  h.total_bytes = 400;
  h.dtype = static_cast<uint8_t>(DType::Float64);
  h.redop = static_cast<uint8_t>(RedOp::Max) | (static_cast<uint8_t>(Collective::AllReduceGather) << 4);
  CHECK(f.write(h) == nullptr);
  CHECK_EQ(f.op->status().message,
           std::string("all_reduce tag 7 #3: peers disagree: peer 9 (10.0.0.9:1) called all_reduce with 133 bytes of "
                       "float64 op max in a world of 3, this peer called all_reduce with 120 bytes of float32 op sum "
                       "in a world of 3; every peer must make the same call (collective, size, dtype, op)"));
  Fixture g;
  h = g.peer->header(Phase::ReduceScatter, 0);
  h.redop = 0xF1;  // no such collective
  h.dtype = 0xEE;
  CHECK(g.write(h) == nullptr);
  CHECK_CONTAINS(g.op->status().message, "called ? with 120 bytes of ? op sum in a world of 3");
}

TEST(bad_chunk_index_offset_length) {
  Fixture a;
  net::DataHeader h = a.peer->header(Phase::ReduceScatter, 0);
  h.chunk = 3;
  check_protocol_error(a, h, "chunk index out of range");
  Fixture b;
  h = b.peer->header(Phase::ReduceScatter, 0);
  h.offset = 4;
  check_protocol_error(b, h, "chunk offset/length do not match the layout");
  Fixture c;
  h = c.peer->header(Phase::ReduceScatter, 0);
  h.length = 36;
  check_protocol_error(c, h, "chunk offset/length do not match the layout");
}

TEST(segments_this_rank_never_receives) {
  Fixture a;  // reduce-scatter never brings back segment 1, sent first
  check_protocol_error(a, a.peer->header(Phase::ReduceScatter, 1),
                       "chunk of a segment this peer never receives in this phase");
  Fixture b;  // all-gather never brings segment 2, owned
  check_protocol_error(b, b.peer->header(Phase::AllGather, 2), "chunk of a segment this peer never receives");
  Fixture c(Collective::ReduceScatter);  // no all-gather phase at all
  check_protocol_error(c, c.peer->header(Phase::AllGather, 0), "chunk of a segment this peer never receives");
  Fixture d(Collective::AllGather);  // no reduce-scatter phase
  check_protocol_error(d, d.peer->header(Phase::ReduceScatter, 0), "chunk of a segment this peer never receives");
}

TEST(duplicate_chunk) {
  Fixture f;
  net::DataHeader h = f.peer->header(Phase::ReduceScatter, 0);
  CHECK(f.deliver(h));
  CHECK_EQ(f.op->processed(), 1u);
  CHECK_EQ(f.sender.sent.size(), 1u);  // folded and forwarded
  check_protocol_error(f, h, "chunk received twice");
}

TEST(failed_partial_write_is_not_counted) {
  Fixture f;
  net::DataHeader h = f.peer->header(Phase::ReduceScatter, 0);
  CHECK(f.write(h) != nullptr);
  f.op->end_write(h, false);
  CHECK_EQ(f.op->processed(), 0u);
  CHECK(f.sender.sent.empty());
  f.op->wait_quiescent();  // the writer was released
}

TEST(start_frames) {
  Fixture f;
  net::DataHeader s = f.peer->header(Phase::Start, 0);
  CHECK(f.deliver(s));
  CHECK_EQ(f.op->processed(), 1u);
  CHECK(f.sender.sent.empty());  // no handler for a start frame
  check_protocol_error(f, s, "duplicate or non-empty start frame");
  Fixture g;
  s.length = 4;
  check_protocol_error(g, s, "duplicate or non-empty start frame");
}

// Regression: an op over an empty tensor may have a null work buffer (torch's
// data_ptr() of zero elements); its start frame must still be accepted.
TEST(start_frame_for_an_op_with_a_null_work_buffer) {
  for (Collective c : {Collective::AllReduce, Collective::AllReduceGather, Collective::AllGather,
                       Collective::ReduceScatter, Collective::Broadcast}) {
    OpParams p;
    p.key = OpKey{1, 0, 0};
    p.collective = c;
    p.world_size = 2;
    p.rank = 1;
    auto op = std::make_shared<Op>(p);
    p.rank = 0;
    Op peer(p);
    const net::DataHeader s = peer.header(Phase::Start, 0);
    char* dst = op->begin_write(s, "peer 0");
    CHECK(dst != nullptr);
    if (dst) op->end_write(s, true);
    CHECK(!op->failed());
    CHECK_EQ(op->processed(), 1u);
  }
}

TEST(frames_after_a_failure_are_dropped_quietly) {
  Fixture f;
  f.op->fail(FailKind::Aborted, "the epoch ended");
  CHECK(f.write(f.peer->header(Phase::ReduceScatter, 0)) == nullptr);
  CHECK(f.write(f.peer->header(Phase::Start, 0)) == nullptr);
  CHECK_EQ(f.op->status().message, std::string("the epoch ended"));  // first failure wins
}

TEST(sending_before_start_fails_the_op) {
  OpParams p;
  p.world_size = 2;
  auto op = std::make_shared<Op>(p);
  op->send(Phase::Start, 0, nullptr);
  CHECK_EQ(op->status().kind, FailKind::Invalid);
}

TEST_MAIN()
