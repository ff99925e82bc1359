// Element types and reduction ops understood by the data plane. The numeric
// values are part of the wire format (they travel in every data frame header
// so a receiver can detect peers that disagree), so never renumber them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace pyccl {

enum class DType : uint8_t {
  Float32 = 1,
  Float64 = 2,
  Float16 = 3,
  BFloat16 = 4,
  Int8 = 5,
  UInt8 = 6,
  Int16 = 7,
  Int32 = 8,
  Int64 = 9,
};

enum class RedOp : uint8_t { Sum = 1, Avg = 2, Min = 3, Max = 4, Prod = 5 };

bool valid_dtype(uint8_t code);
bool valid_redop(uint8_t code);
size_t dtype_size(DType t);
const char* dtype_name(DType t);
const char* redop_name(RedOp op);

}  // namespace pyccl
