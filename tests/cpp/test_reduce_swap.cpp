// The in-place all-reduce's swapping fold (reduce_swap) against the plain
// kernels: for every dtype, op and step kind, the result has the same bits
// as reduce_step / reduce_final, and the partial's buffer ends up holding
// the original.
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "harness.h"
#include "kernels/dtype.h"
#include "kernels/reduce.h"

using namespace pyccl;

TEST(reduce_swap_matches_the_plain_kernels_bit_for_bit) {
  const DType dtypes[] = {DType::Float32, DType::Float64, DType::Float16, DType::BFloat16, DType::Int8,
                          DType::UInt8,   DType::Int16,   DType::Int32,   DType::Int64};
  const RedOp ops[] = {RedOp::Sum, RedOp::Avg, RedOp::Prod, RedOp::Min, RedOp::Max};
  std::mt19937 rng(7);
  for (DType t : dtypes) {
    const size_t elem = dtype_size(t);
    for (size_t count : {size_t{1}, size_t{7}, size_t{1000}, size_t{4099}}) {
      const size_t bytes = count * elem;
      std::vector<uint8_t> partial(bytes), mine(bytes);
      for (auto& b : partial) b = static_cast<uint8_t>(rng() % 61);  // small, finite values in every dtype
      for (auto& b : mine) b = static_cast<uint8_t>(rng() % 61);
      for (RedOp op : ops) {
        for (bool final_step : {false, true}) {
          std::vector<uint8_t> want = partial, p = partial, m = mine;
          if (final_step) reduce_final(t, op, want.data(), mine.data(), count, 3);
          else reduce_step(t, op, want.data(), mine.data(), count);
          reduce_swap(t, op, final_step, p.data(), m.data(), count, 3);
          const std::string what = std::string(dtype_name(t)) + " " + redop_name(op) + (final_step ? " final" : "");
          if (m != want) ::pyccl_test::report(__FILE__, __LINE__, what + ": result differs from the plain kernel");
          if (p != mine) ::pyccl_test::report(__FILE__, __LINE__, what + ": the original was not kept");
        }
      }
    }
  }
}

TEST_MAIN()
