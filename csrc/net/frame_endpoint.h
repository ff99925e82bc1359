// What the transport knows of the things whose frames it carries.
//
// The connections (send_conn.*, ring_links.*) move headers and payloads;
// they know nothing of collectives. A FrameSource is whoever produced a
// frame (an op): it counts the frame as pending until it is written or
// dropped, and is failed if its connection breaks. A FrameSender is
// whatever takes frames for the next peer (the ring links, or a fake in the
// C++ unit tests).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"
#include "net/wire_format.h"

namespace pyccl::net {

class FrameSource {
 public:
  virtual ~FrameSource() = default;
  // A frame was handed to a connection; send_done follows exactly once.
  virtual void add_pending_send() = 0;
  // The frame was written (ok, `bytes` of payload) or dropped.
  virtual void send_done(bool ok, uint64_t bytes) = 0;
  // Whether the source failed already (its frames need not be written).
  virtual bool failed() const = 0;
  // First failure wins.
  virtual void fail(FailKind kind, const std::string& message) = 0;
};

class FrameSender {
 public:
  virtual ~FrameSender() = default;
  // Transmit `header` and header.length payload bytes from `payload`, which
  // must stay valid until the source's send_done for this frame.
  virtual void send(const std::shared_ptr<FrameSource>& source, const DataHeader& header, const void* payload) = 0;
};

}  // namespace pyccl::net
