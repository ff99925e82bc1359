#include "collectives/gather_allreduce.h"

#include <cstring>

#include "collectives/ring_allgather.h"
#include "kernels/reduce.h"

namespace pyccl {

Status run_gather_all_reduce(const std::shared_ptr<Op>& op, net::RingLinks& links,
                             const std::function<Status()>& publish, void* result) {
  if (Status st = run_ring_all_gather(op, links, publish); !st.ok()) return st;
  // run_ring_all_gather returns only once no reader writes into the gathered
  // buffer, so it is stable here.
  const int n = op->world_size();
  const size_t bytes = op->layout().total_bytes() / static_cast<size_t>(n);
  const size_t count = bytes / op->layout().elem_size();
  const char* gathered = op->work();
  if (bytes == 0) return Status::Ok();
  std::memcpy(result, gathered, bytes);
  for (int k = 1; k < n - 1; ++k) reduce_step(op->dtype(), op->redop(), result, gathered + k * bytes, count);
  reduce_final(op->dtype(), op->redop(), result, gathered + (n - 1) * bytes, count, n);
  return Status::Ok();
}

}  // namespace pyccl
