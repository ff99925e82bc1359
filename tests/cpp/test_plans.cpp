// Every collective's plan, run by the ring driver on a simulated ring (no
// sockets): frames go to the next rank's Op in a random order, as striping
// over connections may deliver them. For every collective and world sizes
// 2..5: each rank receives exactly the (phase, chunk) set its plan says and
// its predecessor sends, as many frames as it expects, and the right result.
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "collectives/collective.h"
#include "collectives/op.h"
#include "collectives/plan.h"
#include "collectives/ring_driver.h"
#include "harness.h"

using namespace pyccl;
using net::Phase;

namespace {

const Collective kAll[] = {Collective::AllReduce, Collective::ReduceScatter, Collective::AllGather,
                           Collective::Broadcast, Collective::AllReduceQ8,   Collective::AllReduceGather};

float value(int rank, size_t i) { return static_cast<float>((i * 7 + static_cast<size_t>(rank) * 3) % 11); }

using Received = std::set<std::pair<int, uint32_t>>;  // (phase, chunk)

class SimRing {
 public:
  struct Link : net::FrameSender {
    SimRing* ring = nullptr;
    int rank = 0;
    void send(const std::shared_ptr<net::FrameSource>& src, const net::DataHeader& h, const void* payload) override {
      src->add_pending_send();
      ring->queue_.push_back(Frame{rank, src, h, payload});
    }
  };

  SimRing(int n, unsigned seed) : received(n), starts(n, 0), n_(n), rng_(seed), links_(n) {
    for (int r = 0; r < n; ++r) {
      links_[r].ring = this;
      links_[r].rank = r;
    }
  }

  // Opens every rank's op (in rank order), then delivers frames until none is left.
  void run(std::vector<std::shared_ptr<Op>>& ops) {
    for (int r = 0; r < n_; ++r) CHECK(open_ring(ops[r], links_[r], [] { return Status::Ok(); }).ok());
    while (!queue_.empty()) {
      const size_t i = rng_() % queue_.size();
      Frame f = queue_[i];
      queue_[i] = queue_.back();
      queue_.pop_back();
      deliver(*ops[(f.from + 1) % n_], f);
    }
  }

  std::vector<Received> received;  // data frames per receiving rank
  std::vector<size_t> starts;      // start frames per receiving rank

 private:
  struct Frame {
    int from;
    std::shared_ptr<net::FrameSource> src;
    net::DataHeader h;
    const void* payload;
  };

  void deliver(Op& to, const Frame& f) {
    char* dst = to.begin_write(f.h, "peer " + std::to_string(f.from));
    if (dst == nullptr) {
      ::pyccl_test::report(__FILE__, __LINE__, "frame rejected: " + to.status().message);
    } else {
      if (f.h.length) std::memcpy(dst, f.payload, f.h.length);
      if (f.h.phase == static_cast<uint8_t>(Phase::Start)) ++starts[to.rank()];
      else CHECK(received[to.rank()].insert({f.h.phase, f.h.chunk}).second);
      to.end_write(f.h, true);
    }
    f.src->send_done(true, f.h.length);
  }

  const int n_;
  std::mt19937 rng_;
  std::vector<Link> links_;
  std::vector<Frame> queue_;
};

// The buffers of one rank.
struct Buffers {
  std::vector<float> in, out;
};

// Element range [lo, hi) of segment s.
std::pair<size_t, size_t> segment_range(const RingLayout& L, int s) {
  const uint32_t a = L.first_chunk(s), b = L.first_chunk(s + 1);
  if (a == b) return {0, 0};
  const size_t lo = L.chunk(a).offset / L.elem_size();
  return {lo, lo + (L.chunk(b - 1).offset + L.chunk(b - 1).length) / L.elem_size() - lo};
}

// The input of rank r: the whole tensor, or (all-gather) its segment.
std::vector<float> input_of(Collective c, size_t count, int n, int r) {
  if (c != Collective::AllGather) {
    std::vector<float> in(count);
    for (size_t i = 0; i < count; ++i) in[i] = value(r, i);
    return in;
  }
  RingLayout L(count, sizeof(float), n);
  auto [lo, hi] = segment_range(L, r);
  std::vector<float> in;
  for (size_t i = lo; i < hi; ++i) in.push_back(value(0, i));
  return in;
}

void check_result(Collective c, size_t count, int n, int root, const std::vector<Buffers>& bufs,
                  const std::vector<std::shared_ptr<Op>>& ops) {
  for (int r = 0; r < n; ++r) {
    const std::vector<float>& out = bufs[r].out;
    size_t lo = 0, hi = count;
    if (c == Collective::ReduceScatter) std::tie(lo, hi) = segment_range(ops[r]->layout(), r);
    if (c == Collective::Broadcast && r == root) continue;
    for (size_t i = lo; i < hi; ++i) {
      float want = 0;
      for (int k = 0; k < n; ++k) want += value(k, i);
      if (c == Collective::AllGather) want = value(0, i);
      if (c == Collective::Broadcast) want = value(root, i);
      // Quantized: within a few codes of the sum, and the same bits everywhere.
      const bool good = c == Collective::AllReduceQ8
                            ? std::fabs(out[i] - want) <= 0.06f * 11 * n && out[i] == bufs[0].out[i]
                            : out[i] == want;
      if (!good) {
        ::pyccl_test::report(__FILE__, __LINE__, std::string(collective_name(c)) + ": wrong value at rank " +
                                                     std::to_string(r) + " element " + std::to_string(i));
        return;
      }
    }
  }
}

// Runs collective `c` over `count` elements in a world of n and checks
// arrivals against the plans and the result.
void run_case(Collective c, size_t count, int n, int root, unsigned seed) {
  std::vector<Buffers> bufs(n);
  std::vector<std::shared_ptr<Op>> ops;
  for (int r = 0; r < n; ++r) {
    bufs[r].in = input_of(c, count, n, r);
    bufs[r].out.assign(count, -1.0f);
    OpParams p;
    p.key = OpKey{1, 0, seed};
    p.collective = c;
    p.root = root;
    p.input = bufs[r].in.data();
    p.work = bufs[r].out.data();
    p.count = count;
    p.rank = r;
    p.world_size = n;
    ops.push_back(std::make_shared<Op>(p));
  }
  SimRing ring(n, seed);
  ring.run(ops);
  for (int r = 0; r < n; ++r) {
    const CollectivePlan& plan = ops[r]->plan();
    const RingLayout& L = ops[r]->layout();
    Received want;
    for (Phase ph : {Phase::ReduceScatter, Phase::AllGather})
      for (uint32_t k = 0; k < L.num_chunks(); ++k)
        if (plan.receives(ph, static_cast<int>(L.chunk(k).segment))) want.insert({static_cast<int>(ph), k});
    CHECK(ring.received[r] == want);
    CHECK_EQ(ops[r]->processed(), plan.expected_arrivals());
    CHECK_EQ(ring.starts[r] + ring.received[r].size(), plan.expected_arrivals());
    CHECK(ring.starts[r] <= 1);
    if (ops[r]->processed() != plan.expected_arrivals()) ops[r]->fail(FailKind::Protocol, "test: arrivals missing");
    const Status st = close_ring(*ops[r]);
    CHECK(st.ok());
    if (!st.ok()) std::fprintf(stderr, "  rank %d: %s\n", r, st.message.c_str());
  }
  check_result(c, count, n, root, bufs, ops);
}

}  // namespace

TEST(spec_table_is_indexed_by_wire_code) {
  for (Collective c : kAll) {
    const CollectiveSpec* spec = find_collective(static_cast<uint8_t>(c));
    CHECK(spec != nullptr);
    if (spec) CHECK_EQ(spec->code, c);
    CHECK(spec == &collective_spec(c));
  }
  CHECK(find_collective(6) == nullptr);
  CHECK(find_collective(15) == nullptr);
  CHECK_EQ(std::string(collective_name(Collective::AllReduceGather)), "all_reduce");
  CHECK_EQ(std::string(collective_name(Collective::AllReduceQ8)), "all_reduce(quantize=uint8)");
  CHECK_EQ(call_bytes(collective_spec(Collective::AllReduceGather), 120, 3), 40u);
  CHECK_EQ(call_bytes(collective_spec(Collective::AllReduce), 120, 3), 120u);
}

// At step s a rank receives what its predecessor sent at step s: the
// segment it sent first (step 0), then what it received at step s - 1.
TEST(ring_geometry_steps_and_owners) {
  for (int off = 0; off <= 1; ++off) {
    for (int n = 2; n <= 5; ++n) {
      std::set<int> owned;
      for (int r = 0; r < n; ++r) {
        const RingGeometry g{r, n, off}, next{(r + 1) % n, n, off};
        owned.insert(g.owned());
        CHECK_EQ(g.owned(), ring_mod(r + off, n));
        for (int s = 0; s < n - 1; ++s) {
          for (Phase ph : {Phase::ReduceScatter, Phase::AllGather}) {
            const int first = ph == Phase::ReduceScatter ? g.first_sent() : g.owned();
            CHECK_EQ(next.segment_at(ph, s), s == 0 ? first : g.segment_at(ph, s - 1));
            CHECK_EQ(g.step_of(ph, g.segment_at(ph, s)), s);
            CHECK(g.segment_at(ph, s) != (ph == Phase::ReduceScatter ? g.first_sent() : g.owned()));
          }
        }
        CHECK_EQ(g.segment_at(Phase::ReduceScatter, n - 2), g.owned());     // the owner finishes it
        CHECK_EQ(g.segment_at(Phase::AllGather, n - 2), next.owned());      // the successor's: been everywhere
        CHECK(g.last_step(g.step_of(Phase::ReduceScatter, g.owned())));
      }
      CHECK_EQ(owned.size(), static_cast<size_t>(n));  // every segment has one owner
    }
  }
}

TEST(plans_use_the_expected_ring) {
  std::vector<float> buf(12);
  for (Collective c : kAll) {
    OpParams p;
    p.collective = c;
    p.input = p.work = buf.data();
    p.count = 12;
    p.world_size = 3;
    p.rank = 2;
    Op op(p);
    const auto* ring = dynamic_cast<const RingPlan*>(&op.plan());
    CHECK_EQ(ring == nullptr, c == Collective::Broadcast);
    if (!ring) continue;
    const bool classic = c == Collective::AllReduce || c == Collective::AllReduceQ8;
    CHECK_EQ(ring->geometry().owner_offset, classic ? 1 : 0);
    CHECK_EQ(ring->geometry().owned(), classic ? 0 : 2);
  }
}

TEST(every_plan_on_a_simulated_ring) {
  unsigned seed = 1;
  for (Collective c : kAll) {
    for (int n = 2; n <= 5; ++n) {
      const size_t n_ = static_cast<size_t>(n);
      for (size_t count : {size_t{0}, size_t{1}, n_ - 1, n_, 2 * n_ + 1, size_t{1000}, n_ * 40000 + 3}) {
        if (c == Collective::Broadcast) {
          for (int root = 0; root < n; ++root) run_case(c, count, n, root, seed++);
        } else {
          run_case(c, count, n, 0, seed++);
        }
      }
    }
  }
}

TEST_MAIN()
