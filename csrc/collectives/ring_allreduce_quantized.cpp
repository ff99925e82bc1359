// Ring all-reduce of float32 with uint8 min-max quantization on the wire
// (about 4x fewer bytes). Reduce-scatter re-quantizes each partial sum per
// hop; the owner of a segment quantizes its final value once, applies
// dequantize(quantize(x)) to its own copy, and those bytes are forwarded
// verbatim in the all-gather, so every peer decodes identical bits.
// Non-finite values fail the op with a mismatch naming the cause.
//
// Chunk c travels as quantized_bytes(elements of c) bytes and lands in a
// per-phase staging buffer of this plan, not in the work buffer.
#include <vector>

#include "collectives/collective.h"
#include "collectives/op.h"
#include "collectives/plan.h"
#include "kernels/quantize.h"
#include "kernels/reduce.h"

namespace pyccl {

using net::Phase;

namespace {

const char* const kNonFinite =
    "quantized all-reduce: the values contain NaN or Inf, which uint8 quantization cannot represent; "
    "use an unquantized all-reduce or clean the input";

class QuantizedAllReducePlan final : public RingPlan {
 public:
  explicit QuantizedAllReducePlan(Op& op)
      : RingPlan(op, /*owner_offset=*/1, /*reduce_scatter=*/true, /*all_gather=*/true) {
    const RingLayout& L = op.layout();
    const size_t bytes = L.total_bytes() / L.elem_size() + kQuantHeaderBytes * L.num_chunks();
    q_rs_.resize(bytes);
    q_ag_.resize(bytes);
    q_send_.resize(bytes);
  }

  uint32_t wire_length(uint32_t c) const override {
    return static_cast<uint32_t>(quantized_bytes(op_.layout().chunk(c).length / op_.layout().elem_size()));
  }
  char* landing(Phase phase, uint32_t c) override { return reinterpret_cast<char*>(q_recv(phase, c)); }

  // As the plain all-reduce: every chunk but those of the segment sent first
  // (reduce-scatter) and the one owned (all-gather).
  size_t expected_arrivals() const override {
    const RingLayout& L = op_.layout();
    return 2 * L.num_chunks() - chunks_in(ring_.first_sent()) - chunks_in(ring_.owned()) +
           start_frame_if_empty(ring_mod(ring_.first_sent() - 1, ring_.world));
  }

  void start() override {
    const RingLayout& L = op_.layout();
    const int first = ring_.first_sent();
    open(chunks_in(first) > 0);
    const auto* input = static_cast<const float*>(op_.input());
    for (uint32_t c = L.first_chunk(first); c < L.first_chunk(first + 1); ++c)
      if (!quantize_and_send(Phase::ReduceScatter, c, input)) break;
  }

  void on_arrival(Phase phase, uint32_t c) override {
    const Chunk& ch = op_.layout().chunk(c);
    const size_t elems = ch.length / sizeof(float);
    auto* work = reinterpret_cast<float*>(op_.work());
    float* w = work + ch.offset / sizeof(float);
    const int s = ring_.step_of(phase, static_cast<int>(ch.segment));
    dequantize_u8(q_recv(phase, c), elems, w);
    if (phase == Phase::ReduceScatter) {
      const float* in = static_cast<const float*>(op_.input()) + ch.offset / sizeof(float);
      if (ring_.last_step(s)) {
        reduce_final(DType::Float32, op_.redop(), w, in, elems, ring_.world);
        // The owner keeps exactly what everybody else will decode.
        if (quantize_and_send(Phase::AllGather, c, work)) dequantize_u8(q_send(c), elems, w);
      } else {
        reduce_step(DType::Float32, op_.redop(), w, in, elems);
        quantize_and_send(Phase::ReduceScatter, c, work);
      }
    } else if (!ring_.last_step(s)) {
      op_.send(Phase::AllGather, c, q_recv(phase, c));  // verbatim
    }
  }

 private:
  size_t q_offset(uint32_t c) const {
    return op_.layout().chunk(c).offset / op_.layout().elem_size() + kQuantHeaderBytes * c;
  }
  uint8_t* q_recv(Phase phase, uint32_t c) {
    return (phase == Phase::ReduceScatter ? q_rs_.data() : q_ag_.data()) + q_offset(c);
  }
  uint8_t* q_send(uint32_t c) { return q_send_.data() + q_offset(c); }

  // Quantize chunk c of `values` into its send slot and send it in `phase`.
  bool quantize_and_send(Phase phase, uint32_t c, const float* values) {
    const Chunk& ch = op_.layout().chunk(c);
    if (!quantize_u8(values + ch.offset / sizeof(float), ch.length / sizeof(float), q_send(c))) {
      op_.fail(FailKind::Mismatch, kNonFinite);
      return false;
    }
    op_.send(phase, c, q_send(c));
    return true;
  }

  std::vector<uint8_t> q_rs_, q_ag_, q_send_;
};

std::unique_ptr<CollectivePlan> make_plan(Op& op) { return std::make_unique<QuantizedAllReducePlan>(op); }

}  // namespace

extern const CollectiveSpec kAllReduceQ8Spec;
const CollectiveSpec kAllReduceQ8Spec{Collective::AllReduceQ8, "all_reduce(quantize=uint8)", false, false, &make_plan};

}  // namespace pyccl
