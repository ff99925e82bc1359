#include "collectives/gather_allreduce.h"

#include <cstring>
#include <vector>

#include "collectives/collective.h"
#include "collectives/op.h"
#include "collectives/ring_allgather.h"
#include "kernels/reduce.h"

namespace pyccl {

namespace {

class GatherAllReducePlan final : public AllGatherPlan {
 public:
  explicit GatherAllReducePlan(Op& op) : AllGatherPlan(op), gathered_(op.layout().total_bytes()) {
    buf_ = gathered_.data();
  }

  // Runs once no reader writes into the gathered buffer, so it is stable.
  Status finish() override {
    const int n = op_.world_size();
    const size_t bytes = op_.layout().total_bytes() / static_cast<size_t>(n);
    const size_t count = bytes / op_.layout().elem_size();
    if (bytes == 0) return Status::Ok();
    void* result = op_.work();
    const char* gathered = gathered_.data();
    std::memcpy(result, gathered, bytes);
    for (int k = 1; k < n - 1; ++k) reduce_step(op_.dtype(), op_.redop(), result, gathered + k * bytes, count);
    reduce_final(op_.dtype(), op_.redop(), result, gathered + (n - 1) * bytes, count, n);
    return Status::Ok();
  }

 private:
  std::vector<char> gathered_;
};

std::unique_ptr<CollectivePlan> make_plan(Op& op) { return std::make_unique<GatherAllReducePlan>(op); }

}  // namespace

extern const CollectiveSpec kAllReduceGatherSpec;
const CollectiveSpec kAllReduceGatherSpec{Collective::AllReduceGather, "all_reduce", false, true, &make_plan};

}  // namespace pyccl
