// Outcome of a data-plane operation. A failure always carries a sentence
// that says what happened; `kind` lets Python pick the exception type and
// lets the master tell the other peers why the op failed.
#pragma once

#include <string>

namespace pyccl {

enum class FailKind : int {
  None = 0,
  Peer = 1,      // a neighbour or its connection went away
  Mismatch = 2,  // peers disagree on size / dtype / op / world size
  Protocol = 3,  // a frame broke the protocol
  Aborted = 4,   // the epoch was drained by the master
  Invalid = 5,   // misuse detected locally (bad arguments)
};

struct Status {
  FailKind kind = FailKind::None;
  std::string message;

  bool ok() const { return kind == FailKind::None; }
  static Status Ok() { return {}; }
  static Status Fail(FailKind k, std::string msg) { return Status{k, std::move(msg)}; }
};

const char* fail_kind_name(FailKind kind);

}  // namespace pyccl
