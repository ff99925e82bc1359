#include "kernels/reduce.h"

#include <cstdint>
#include <type_traits>

#include "kernels/half.h"

namespace pyccl {
namespace {

// Storage types for the two 16-bit floats; arithmetic happens in float.
struct Fp16Tag { using storage = uint16_t; };
struct Bf16Tag { using storage = uint16_t; };

template <typename T> struct Arith {
  using storage = T;
  using compute = T;
  static compute load(storage v) { return v; }
  static storage store(compute v) { return v; }
};
template <> struct Arith<Fp16Tag> {
  using storage = uint16_t;
  using compute = float;
  static compute load(storage v) { return half::fp16_to_float(v); }
  static storage store(compute v) { return half::float_to_fp16(v); }
};
template <> struct Arith<Bf16Tag> {
  using storage = uint16_t;
  using compute = float;
  static compute load(storage v) { return half::bf16_to_float(v); }
  static storage store(compute v) { return half::float_to_bf16(v); }
};

// Signed integers are added and multiplied as unsigned so overflow wraps
// instead of being undefined behaviour.
template <typename C> inline C add(C a, C b) {
  if constexpr (std::is_integral_v<C>) {
    using U = std::make_unsigned_t<C>;
    return static_cast<C>(static_cast<U>(a) + static_cast<U>(b));
  } else {
    return a + b;
  }
}
template <typename C> inline C mul(C a, C b) {
  if constexpr (std::is_integral_v<C>) {
    using U = std::make_unsigned_t<C>;
    // Promote to at least unsigned int so uint8/uint16 products cannot overflow int.
    using W = std::conditional_t<(sizeof(U) < sizeof(unsigned)), unsigned, U>;
    return static_cast<C>(static_cast<W>(static_cast<U>(a)) * static_cast<W>(static_cast<U>(b)));
  } else {
    return a * b;
  }
}
// NaN-propagating min/max written as compare+select so they vectorize.
template <typename C> inline C min_(C a, C b) { return (a < b || a != a) ? a : b; }
template <typename C> inline C max_(C a, C b) { return (a > b || a != a) ? a : b; }

template <typename Tag, typename F>
__attribute__((always_inline)) inline void loop(void* dst_v, const void* src_v, size_t n, F f) {
  using A = Arith<Tag>;
  auto* __restrict dst = static_cast<typename A::storage*>(dst_v);
  const auto* __restrict src = static_cast<const typename A::storage*>(src_v);
  for (size_t i = 0; i < n; ++i) dst[i] = A::store(f(A::load(dst[i]), A::load(src[i])));
}

template <typename Tag>
__attribute__((always_inline)) inline void run(RedOp op, bool final_step, void* dst, const void* src, size_t n,
                                                int world_size) {
  using C = typename Arith<Tag>::compute;
  switch (op) {
    case RedOp::Sum: loop<Tag>(dst, src, n, [](C a, C b) { return add(a, b); }); break;
    case RedOp::Avg:
      if (final_step) {
        const C div = static_cast<C>(world_size);
        loop<Tag>(dst, src, n, [div](C a, C b) { return static_cast<C>(add(a, b) / div); });
      } else {
        loop<Tag>(dst, src, n, [](C a, C b) { return add(a, b); });
      }
      break;
    case RedOp::Prod: loop<Tag>(dst, src, n, [](C a, C b) { return mul(a, b); }); break;
    case RedOp::Min: loop<Tag>(dst, src, n, [](C a, C b) { return min_(a, b); }); break;
    case RedOp::Max: loop<Tag>(dst, src, n, [](C a, C b) { return max_(a, b); }); break;
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYCCL_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define PYCCL_MULTIVERSION
#endif

// One entry point, compiled once per instruction set; the loader picks the
// best at start-up (ifunc), so wheels stay portable yet use AVX2 where present.
PYCCL_MULTIVERSION
void dispatch(DType dtype, RedOp op, bool final_step, void* dst, const void* src, size_t n, int world_size) {
  switch (dtype) {
    case DType::Float32: run<float>(op, final_step, dst, src, n, world_size); break;
    case DType::Float64: run<double>(op, final_step, dst, src, n, world_size); break;
    case DType::Float16: run<Fp16Tag>(op, final_step, dst, src, n, world_size); break;
    case DType::BFloat16: run<Bf16Tag>(op, final_step, dst, src, n, world_size); break;
    case DType::Int8: run<int8_t>(op, final_step, dst, src, n, world_size); break;
    case DType::UInt8: run<uint8_t>(op, final_step, dst, src, n, world_size); break;
    case DType::Int16: run<int16_t>(op, final_step, dst, src, n, world_size); break;
    case DType::Int32: run<int32_t>(op, final_step, dst, src, n, world_size); break;
    case DType::Int64: run<int64_t>(op, final_step, dst, src, n, world_size); break;
  }
}

}  // namespace

void reduce_step(DType dtype, RedOp op, void* dst, const void* src, size_t count) {
  dispatch(dtype, op, false, dst, src, count, 1);
}

void reduce_final(DType dtype, RedOp op, void* dst, const void* src, size_t count, int world_size) {
  dispatch(dtype, op, true, dst, src, count, world_size);
}

}  // namespace pyccl
