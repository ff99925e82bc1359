#include "collectives/ring_driver.h"

namespace pyccl {

Status open_ring(const std::shared_ptr<Op>& op, net::FrameSender& sender, const std::function<Status()>& publish) {
  op->set_sender(&sender);
  op->plan().prepare();
  if (Status st = publish(); !st.ok()) return st;
  op->plan().start();
  return Status::Ok();
}

Status close_ring(Op& op) {
  op.wait_processed(op.plan().expected_arrivals());
  // The handlers and senders use the op's buffers (and the plan's staging):
  // no thread may touch them once we return.
  op.wait_quiescent();
  if (Status st = op.status(); !st.ok()) return st;
  return op.plan().finish();
}

Status run_ring(const std::shared_ptr<Op>& op, net::FrameSender& sender, const std::function<Status()>& publish) {
  if (Status st = open_ring(op, sender, publish); !st.ok()) return st;
  return close_ring(*op);
}

}  // namespace pyccl
