// Ring all-gather: rank r contributes segment r; every rank ends with all
// segments. n-1 steps; chunks are forwarded verbatim. op->input() holds
// this rank's segment alone (segment-sized); it is copied into its place
// first. The small all-reduce (gather_allreduce.cpp) reuses this plan over
// a buffer of its own.
#pragma once

#include "collectives/plan.h"

namespace pyccl {

class AllGatherPlan : public RingPlan {
 public:
  explicit AllGatherPlan(Op& op);

  size_t expected_arrivals() const override;
  char* landing(net::Phase phase, uint32_t chunk) override;
  void prepare() override;
  void start() override;
  void on_arrival(net::Phase phase, uint32_t chunk) override;

 protected:
  char* buf_;  // where the segments gather: op->work() unless a subclass says otherwise
};

}  // namespace pyccl
