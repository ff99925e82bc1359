#include "collectives/ring_allreduce_quantized.h"

#include "collectives/ring_common.h"
#include "kernels/quantize.h"
#include "kernels/reduce.h"

namespace pyccl {

using net::Phase;
using ring::chunks_in;
using ring::mod;

namespace {
const char* const kNonFinite =
    "quantized all-reduce: the values contain NaN or Inf, which uint8 quantization cannot represent; "
    "use an unquantized all-reduce or clean the input";
}

Status run_ring_all_reduce_quantized(const std::shared_ptr<Op>& op, net::RingLinks& links,
                                     const std::function<Status()>& publish) {
  const RingLayout& L = op->layout();
  const int n = op->world_size();
  const int r = op->rank();
  const auto* input = static_cast<const float*>(op->input());
  auto* work = reinterpret_cast<float*>(op->work());

  // Quantize chunk c of `values` into its send slot and send it in `phase`.
  auto quantize_and_send = [&](Phase phase, uint32_t c, const float* values) {
    const Chunk& ch = L.chunk(c);
    const size_t elems = ch.length / sizeof(float);
    if (!quantize_u8(values + ch.offset / sizeof(float), elems, op->q_send(c))) {
      op->fail(FailKind::Mismatch, kNonFinite);
      return false;
    }
    links.send(op, op->header(phase, c), op->q_send(c));
    return true;
  };

  op->set_on_arrival([&](Phase phase, uint32_t c) {
    const Chunk& ch = L.chunk(c);
    const size_t elems = ch.length / sizeof(float);
    float* w = work + ch.offset / sizeof(float);
    const int s = op->step_of(phase, static_cast<int>(ch.segment));
    dequantize_u8(op->q_recv(phase, c), elems, w);
    if (phase == Phase::ReduceScatter) {
      const float* in = input + ch.offset / sizeof(float);
      if (s == n - 2) {
        reduce_final(DType::Float32, op->redop(), w, in, elems, n);
        // The owner keeps exactly what everybody else will decode.
        if (quantize_and_send(Phase::AllGather, c, work)) dequantize_u8(op->q_send(c), elems, w);
      } else {
        reduce_step(DType::Float32, op->redop(), w, in, elems);
        quantize_and_send(Phase::ReduceScatter, c, work);
      }
    } else if (s < n - 2) {
      links.send(op, op->header(Phase::AllGather, c), op->q_recv(phase, c));  // verbatim
    }
  });

  const size_t expected = 2 * L.num_chunks() - chunks_in(L, r) - chunks_in(L, mod(r + 1, n)) +
                          (chunks_in(L, mod(r - 1, n)) == 0 ? 1 : 0);
  if (Status st = publish(); !st.ok()) return st;
  ring::open_op(op, links, chunks_in(L, r) > 0);
  for (uint32_t c = L.first_chunk(r); c < L.first_chunk(r + 1); ++c)
    if (!quantize_and_send(Phase::ReduceScatter, c, input)) break;
  return ring::finish(op, expected);
}

}  // namespace pyccl
