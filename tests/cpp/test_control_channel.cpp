// The verdict path in the core: the op_ok/heartbeat/done codec and the
// ControlChannel's leader/follower reading of a master connection. The
// "master" is the other end of a socketpair, written by the test.
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <string>
#include <thread>

#include "control/control_channel.h"
#include "control/verdict_frames.h"
#include "harness.h"

using namespace pyccl::control;
using namespace std::chrono_literals;

namespace {

std::string unhex(const std::string& h) {
  std::string out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16)));
  return out;
}

// Frames as msgpack-python encodes them (wire.encode(frame.to_wire())).
const std::string kOpOk7_3_9 = unhex("0000001d84a474797065a56f705f6f6ba565706f636807a374616703a373657109");
const std::string kHeartbeat = unhex("0000001081a474797065a9686561727462656174");
// {"type": "round_done", "round": 1, "changed": false}: not for the core.
const std::string kRoundDone = [] {
  std::string body = unhex("83a474797065aa726f756e645f646f6e65a5726f756e6401a76368616e676564c2");
  std::string f(4, '\0');
  f[3] = static_cast<char>(body.size());
  return f + body;
}();

FastFrame classify_frame(const std::string& frame, VerdictKey* key) {
  return classify(reinterpret_cast<const uint8_t*>(frame.data()) + 4, frame.size() - 4, key);
}

struct Master {
  int fds[2];
  Master() {
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
  }
  ~Master() {
    ::close(fds[0]);
    ::close(fds[1]);
  }
  int peer_fd() const { return fds[0]; }
  void send(const std::string& bytes) const {
    if (::write(fds[1], bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size())) std::abort();
  }
  std::string recv_some() const {
    char buf[256];
    const ssize_t n = ::read(fds[1], buf, sizeof buf);
    return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
  }
  void hang_up() const { ::shutdown(fds[1], SHUT_RDWR); }
};

// The Python control thread: calls next_frame() until the end, counting frames.
struct Background {
  ControlChannel& ch;
  std::atomic<int> frames{0};
  std::atomic<int> end{-1};
  std::thread t;
  explicit Background(ControlChannel& c) : ch(c), t([this] {
    for (;;) {
      std::string body;
      const ChannelEnd e = ch.next_frame(&body);
      if (e != ChannelEnd::None) {
        end = static_cast<int>(e);
        return;
      }
      ++frames;
      ch.wake();  // as the Python reader does after each frame
    }
  }) {}
  ~Background() {
    ch.end(ChannelEnd::Stopped, "test over");
    t.join();
  }
};

template <typename Pred>
bool eventually(Pred p) {
  for (int i = 0; i < 400; ++i) {
    if (p()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return false;
}

}  // namespace

TEST(codec_reads_what_msgpack_python_writes) {
  VerdictKey k;
  CHECK(classify_frame(kOpOk7_3_9, &k) == FastFrame::OpOk);
  CHECK((k == VerdictKey{7, 3, 9}));
  CHECK(classify_frame(kHeartbeat, &k) == FastFrame::Heartbeat);
  CHECK(classify_frame(kRoundDone, &k) == FastFrame::Other);
  CHECK_EQ(encode_done({1, 0, 5}), unhex("0000001c84a474797065a4646f6e65a565706f636801a374616700a373657105"));
  CHECK_EQ(encode_done({300, (1u << 31) - 1, uint64_t{1} << 40}),
           unhex("0000002a84a474797065a4646f6e65a565706f6368cd012ca3746167ce7fffffffa3736571cf0000010000000000"));
}

TEST(codec_leaves_anything_unusual_to_python) {
  VerdictKey k;
  auto body = [](const std::string& h) { return unhex("00000000" + h); };
  // An extra field, a tag above 2**31-1, a bool seq, a negative int8, a repeated key, a truncated map.
  for (const std::string& f : {
           body("85a474797065a56f705f6f6ba565706f636807a374616703a373657109a178c0"),
           body("84a474797065a56f705f6f6ba565706f636807a3746167ce80000000a373657109"),
           body("84a474797065a56f705f6f6ba565706f636807a374616703a3736571c3"),
           body("84a474797065a56f705f6f6ba565706f636807a3746167d0ffa373657109"),
           body("84a474797065a56f705f6f6ba565706f636807a565706f636807a373657109"),
           body("84a474797065a56f705f6f6ba565706f636807a374616703a3736571"),
       })
    CHECK(classify_frame(f, &k) == FastFrame::Other);
  // Other integer widths are still ints to Python, so they are to the core.
  CHECK(classify_frame(body("84a474797065a56f705f6f6ba565706f6368cf0000000000000007a3746167d103e8a373657109"), &k) ==
        FastFrame::OpOk);
  CHECK((k == VerdictKey{7, 1000, 9}));
}

TEST(a_caller_alone_reads_its_own_verdict) {
  Master m;
  ControlChannel ch(m.peer_fd(), 5.0, true);
  auto r = std::async(std::launch::async, [&] { return ch.done_and_wait({7, 3, 9}, ch.generation()); });
  CHECK(eventually([&] { return !m.recv_some().empty(); }));  // the done arrived
  m.send(kHeartbeat + kOpOk7_3_9);
  CHECK(r.wait_for(2s) == std::future_status::ready);
  CHECK(r.get() == WaitResult::Decided);
  // Taken, not yet recorded by the caller: a resume must still count it.
  const auto pending = ch.unrecorded();
  CHECK(pending.size() == 1 && (pending[0] == VerdictKey{7, 3, 9}));
  ch.recorded({7, 3, 9});
  CHECK(ch.unrecorded().empty() && ch.take_decided().empty());
}

TEST(verdicts_reach_callers_and_other_frames_reach_python_in_order) {
  for (bool preempt : {true, false}) {
    Master m;
    ControlChannel ch(m.peer_fd(), 5.0, preempt);
    Background bg(ch);
    auto r = std::async(std::launch::async, [&] { return ch.wait({7, 3, 9}, ch.generation()); });
    std::this_thread::sleep_for(20ms);
    m.send(kRoundDone + kOpOk7_3_9 + kRoundDone);
    CHECK(r.wait_for(2s) == std::future_status::ready);
    // A wake() for the first round_done may send the caller back to look first.
    WaitResult got = r.get();
    if (got == WaitResult::Moved) got = ch.wait({7, 3, 9}, ch.generation());
    CHECK(got == WaitResult::Decided);
    CHECK(eventually([&] { return bg.frames == 2; }));
  }
}

TEST(a_caller_that_leaves_on_a_new_generation_hands_the_socket_back) {
  // The regression: a caller asked the background reader to step aside and
  // then left on wake(); the background reader must read again.
  Master m;
  ControlChannel ch(m.peer_fd(), 5.0, true);
  Background bg(ch);
  std::this_thread::sleep_for(20ms);  // the background reader polls
  // The window is between the background reader stepping aside and the
  // caller waking: wake() at varying delays lands in it now and then.
  for (int i = 0; i < 400; ++i) {
    const uint64_t g = ch.generation();
    auto r = std::async(std::launch::async, [&] { return ch.wait({1, 0, static_cast<uint64_t>(i)}, g); });
    std::this_thread::sleep_for(std::chrono::microseconds((i * 37) % 300));
    ch.wake();
    CHECK(r.wait_for(2s) == std::future_status::ready);
    CHECK(r.get() == WaitResult::Moved);
    m.send(kRoundDone);
    if (!eventually([&] { return bg.frames == i + 1; })) {
      CHECK(bg.frames == i + 1);  // nobody reads the socket any more
      break;
    }
  }
}

TEST(concurrent_callers_each_get_their_own_verdict) {
  Master m;
  ControlChannel ch(m.peer_fd(), 5.0, true);
  Background bg(ch);
  std::vector<std::future<WaitResult>> rs;
  for (uint64_t s = 0; s < 8; ++s)
    rs.push_back(std::async(std::launch::async, [&ch, s] {
      WaitResult w;
      while ((w = ch.wait({2, 1, s}, ch.generation())) == WaitResult::Moved) {
      }
      return w;
    }));
  std::this_thread::sleep_for(20ms);
  for (uint64_t s = 8; s-- > 0;) {
    std::string f = kOpOk7_3_9;  // same layout; patch epoch 7->2, tag 3->1, seq 9->s
    f[4 + 18] = 2;
    f[4 + 23] = 1;
    f[4 + 28] = static_cast<char>(s);
    m.send(f);
    if (s == 4) m.send(kRoundDone);
  }
  for (auto& r : rs) {
    CHECK(r.wait_for(2s) == std::future_status::ready);
    CHECK(r.get() == WaitResult::Decided);
  }
  CHECK(ch.take_decided().empty());
  CHECK(eventually([&] { return bg.frames == 1; }));
}

TEST(endings_wake_everyone_and_say_why) {
  {  // EOF
    Master m;
    ControlChannel ch(m.peer_fd(), 5.0, true);
    Background bg(ch);
    auto r = std::async(std::launch::async, [&] { return ch.wait({1, 0, 0}, ch.generation()); });
    std::this_thread::sleep_for(20ms);
    m.send(kOpOk7_3_9);  // decided for nobody waiting: Python takes it later
    m.hang_up();
    CHECK(r.wait_for(2s) == std::future_status::ready);
    CHECK(r.get() == WaitResult::Ended);
    CHECK(eventually([&] { return bg.end == static_cast<int>(ChannelEnd::Closed); }));
    CHECK(!ch.send(encode_done({1, 0, 0})));
    const auto left = ch.take_decided();
    CHECK(left.size() == 1 && (left[0] == VerdictKey{7, 3, 9}));
  }
  {  // silence: nothing for silence_s, not even a heartbeat
    Master m;
    ControlChannel ch(m.peer_fd(), 0.2, true);
    Background bg(ch);
    CHECK(eventually([&] { return bg.end == static_cast<int>(ChannelEnd::Silent); }));
  }
  {  // a pause of the reader is not silence: what waits in the socket counts
    Master m;
    ControlChannel ch(m.peer_fd(), 0.2, false);
    m.send(kRoundDone);
    std::this_thread::sleep_for(400ms);  // nobody reads (the control thread busy elsewhere)
    std::string body;
    CHECK(ch.next_frame(&body) == ChannelEnd::None);
    CHECK_EQ(body, kRoundDone.substr(4));
  }
  {  // a length over the limit
    Master m;
    ControlChannel ch(m.peer_fd(), 5.0, false);
    Background bg(ch);
    m.send(unhex("7fffffff00"));
    CHECK(eventually([&] { return bg.end == static_cast<int>(ChannelEnd::Invalid); }));
  }
}

TEST_MAIN()
