#include "common/status.h"

namespace pyccl {

const char* fail_kind_name(FailKind kind) {
  switch (kind) {
    case FailKind::None: return "ok";
    case FailKind::Peer: return "peer";
    case FailKind::Mismatch: return "mismatch";
    case FailKind::Protocol: return "protocol";
    case FailKind::Aborted: return "aborted";
    case FailKind::Invalid: return "invalid";
  }
  return "?";
}

}  // namespace pyccl
