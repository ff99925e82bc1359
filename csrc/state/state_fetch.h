// The fetcher side of a shared-state transfer: pull byte ranges of several
// keys from several holders at once, straight into the destination buffers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace pyccl::state {

struct Holder {
  uint64_t peer_id;
  std::string host;
  uint16_t port;
};

struct FetchTarget {
  uint32_t key_index;
  uint64_t hash;  // the popular copy's hash: holders serve only that content
  void* dst;
  uint64_t nbytes;
  std::vector<uint64_t>* block_hashes = nullptr;  // filled by fetch_state
};

struct FetchOptions {
  int connections_per_holder = 2;
  uint64_t piece_bytes = 4u << 20;
  double io_timeout_s = 10.0;  // a holder silent this long is given up
  // A run with a secret: prove membership of `epoch` with its key on every
  // connection (see net/membership_proof.h). Empty: an open run.
  std::string key;
  uint64_t epoch = 0;
};

// Blocks until every byte arrived and every key matched its hash (Ok), or
// every holder failed (Peer, naming the last error), or a key arrived with
// another hash (Protocol). Pieces of a failed holder are re-fetched from the
// others. Keys are hashed block by block while they arrive. On a hash
// mismatch `*bad_key` (if given) is the key's index; else it is left as is.
Status fetch_state(const std::vector<Holder>& holders, const std::vector<FetchTarget>& targets,
                   const FetchOptions& options, uint64_t* rx_bytes, int64_t* bad_key = nullptr);

}  // namespace pyccl::state
