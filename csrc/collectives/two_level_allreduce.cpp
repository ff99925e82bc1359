#include "collectives/two_level_allreduce.h"

#include <algorithm>
#include <memory>

#include "kernels/dtype.h"

namespace pyccl {

SubOpResult two_level_all_reduce(const OpParams& p, const TwoLevelGeometry& g, const RunSubOp& run) {
  const size_t elem = dtype_size(p.dtype);
  const auto m = static_cast<size_t>(g.region_size);
  const auto r = static_cast<size_t>(g.region_rank);
  // Segment r of a ring layout over m peers (layout.h: the first count % m
  // segments get one extra element).
  const size_t base = p.count / m, extra = p.count % m;
  const size_t shard_count = base + (r < extra ? 1 : 0);
  const size_t shard_offset = (r * base + std::min(r, extra)) * elem;
  // Not value-initialised (make_unique would zero it): step 2 writes every byte before step 3 reads it.
  std::unique_ptr<char[]> shard(new char[std::max<size_t>(shard_count * elem, 1)]);

  SubOpResult total;
  auto step = [&](SubRing ring, const OpParams& q) {
    SubOpResult res = run(ring, q);
    total.tx_bytes += res.tx_bytes;
    total.rx_bytes += res.rx_bytes;
    if (!res.status.ok()) total.status = res.status;
    return res.status.ok();
  };

  OpParams rs = p;
  rs.collective = Collective::ReduceScatter;
  rs.rank = g.region_rank;
  rs.world_size = g.region_size;
  if (!step(SubRing::Region, rs)) return total;

  OpParams ar = p;
  ar.key.tag = p.key.tag | kTwoLevelTagBit;
  ar.key.seq = 2 * p.key.seq;
  ar.collective = Collective::AllReduce;
  ar.input = static_cast<const char*>(p.work) + shard_offset;
  ar.work = shard.get();
  ar.count = shard_count;
  ar.rank = g.cross_rank;
  ar.world_size = g.cross_size;
  if (!step(SubRing::Cross, ar)) return total;

  OpParams ag = p;
  ag.key.tag = p.key.tag | kTwoLevelTagBit;
  ag.key.seq = 2 * p.key.seq + 1;
  ag.collective = Collective::AllGather;
  ag.input = shard.get();
  ag.rank = g.region_rank;
  ag.world_size = g.region_size;
  step(SubRing::Region, ag);
  return total;
}

}  // namespace pyccl
