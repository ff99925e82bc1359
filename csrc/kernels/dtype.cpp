#include "kernels/dtype.h"

namespace pyccl {

bool valid_dtype(uint8_t code) { return code >= 1 && code <= 9; }
bool valid_redop(uint8_t code) { return code >= 1 && code <= 5; }

size_t dtype_size(DType t) {
  switch (t) {
    case DType::Float64:
    case DType::Int64: return 8;
    case DType::Float32:
    case DType::Int32: return 4;
    case DType::Float16:
    case DType::BFloat16:
    case DType::Int16: return 2;
    case DType::Int8:
    case DType::UInt8: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int8: return "int8";
    case DType::UInt8: return "uint8";
    case DType::Int16: return "int16";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
  }
  return "?";
}

const char* redop_name(RedOp op) {
  switch (op) {
    case RedOp::Sum: return "sum";
    case RedOp::Avg: return "avg";
    case RedOp::Min: return "min";
    case RedOp::Max: return "max";
    case RedOp::Prod: return "prod";
  }
  return "?";
}

}  // namespace pyccl
