// libFuzzer harness: data frames arriving on a ring link (headers and
// payloads), as DataPlane::read_frames handles them.
//
// The input chooses an op (collective, dtype, reduction, size, world size,
// rank), then is read as a stream of frames: a DataHeader, checked by
// net::data_header_problem exactly as a link does, then handed to the op's
// begin_write; when it accepts, as much of the payload as the input still
// holds is written where begin_write said (a short payload is a dropped
// connection: end_write(false)). Arrival handlers run as they would on a
// reader thread (reductions, dequantization of uint8 chunks, forwarding to
// the next peer, here a sink). ASan and UBSan watch every byte.
//
// Fields a link fixes before the op sees a frame (epoch, tag and seq, which
// the registry matches) are forced to the op's own with probability 3/4, so
// the fuzzer spends its time inside the op rather than at the registry.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "collectives/op.h"
#include "net/wire_checks.h"

using namespace pyccl;

namespace {

struct SinkSender : net::FrameSender {
  void send(const std::shared_ptr<net::FrameSource>& src, const net::DataHeader& h, const void*) override {
    src->add_pending_send();
    src->send_done(true, h.length);
  }
};

struct Input {
  const uint8_t* p;
  size_t n;
  uint8_t byte() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  size_t take(void* out, size_t want) {
    const size_t k = want < n ? want : n;
    if (k == 0) return 0;
    std::memcpy(out, p, k);
    p += k;
    n -= k;
    return k;
  }
};

constexpr Collective kCollectives[] = {Collective::AllReduce, Collective::ReduceScatter, Collective::AllGather,
                                       Collective::Broadcast, Collective::AllReduceQ8, Collective::AllReduceGather};
constexpr DType kDTypes[] = {DType::Float32, DType::Float64, DType::Float16, DType::BFloat16, DType::Int8,
                             DType::UInt8,   DType::Int16,   DType::Int32,   DType::Int64};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input in{data, size};
  OpParams p;
  p.key = OpKey{7, 3, 11};
  p.collective = kCollectives[in.byte() % 6];
  p.dtype = p.collective == Collective::AllReduceQ8 ? DType::Float32 : kDTypes[in.byte() % 9];
  p.redop = static_cast<RedOp>(1 + in.byte() % 5);
  p.world_size = 1 + in.byte() % 8;
  p.rank = in.byte() % p.world_size;
  p.root = in.byte() % p.world_size;
  p.count = (static_cast<size_t>(in.byte()) << 2 | in.byte() % 4);  // 0 .. 1023 elements
  const size_t elem = dtype_size(p.dtype);
  const bool per_peer = collective_spec(p.collective).one_input_per_peer;
  const size_t bytes = p.count * elem * (per_peer ? static_cast<size_t>(p.world_size) : 1);
  // Exactly sized heap buffers, so ASan sees any write past them.
  std::vector<uint8_t> input(bytes), work(bytes);
  for (size_t i = 0; i < bytes; ++i) input[i] = static_cast<uint8_t>(i * 31u);
  p.input = bytes ? input.data() : nullptr;
  p.work = bytes ? work.data() : nullptr;
  SinkSender sink;
  auto op = std::make_shared<Op>(p);
  op->set_sender(&sink);

  std::vector<uint8_t> payload;
  while (in.n >= sizeof(net::DataHeader)) {
    net::DataHeader h;
    in.take(&h, sizeof(h));
    if (in.byte() % 4 != 0) {
      h.magic = net::kDataMagic;
      h.version = net::kWireVersion;
      h.epoch = p.key.epoch;
      h.tag = p.key.tag;
      h.seq = p.key.seq;
    }
    if (!net::data_header_problem(h, p.key.epoch).empty()) break;  // the link closes
    if (net::is_keepalive(h)) continue;
    if (h.tag != p.key.tag || h.seq != p.key.seq) continue;  // the registry has no such op: discarded
    char* dest = op->begin_write(h, "fuzz");
    if (dest == nullptr) continue;  // rejected (and the op failed) or late: the payload is discarded
    payload.resize(h.length);
    const size_t got = in.take(payload.data(), h.length);
    if (got > 0) std::memcpy(dest, payload.data(), got);
    op->end_write(h, got == h.length);
    if (got < h.length) break;  // the connection dropped mid-payload
  }
  op->fail(FailKind::Aborted, "fuzz input ended");
  op->wait_quiescent();
  return 0;
}
