// The holder side of a shared-state transfer: the buffers a peer published
// for its current sync, served read-only to fetchers.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "net/socket.h"
#include "state/state_wire.h"

namespace pyccl::state {

struct PublishedKey {
  const void* data;
  uint64_t nbytes;
  uint64_t hash;
};

class StateServer {
 public:
  // Replaces what is published. The buffers must stay unchanged until unpublish().
  void publish(std::vector<PublishedKey> keys);
  // Withdraws the buffers, waiting for requests being served; returns the
  // bytes served since publish().
  uint64_t unpublish();

  // Serves one connection whose first request has already been read.
  void serve(net::Socket& sock, const StateRequest& first);

 private:
  // Validates a request and pins the buffers; returns a reply status.
  ReplyStatus begin(const StateRequest& req, const char** data);
  void end(uint64_t bytes);

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<PublishedKey> keys_;
  int active_ = 0;
  uint64_t served_ = 0;
};

}  // namespace pyccl::state
