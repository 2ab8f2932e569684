// Element types of the kvpo kernels, shared by the OpenMP CPU kernels (g++) and the CUDA kernels
// (nvcc -c): the dtype enum, fp16/bf16 <-> float conversions usable on host and device, element
// traits and a dtype switch. Only standard headers (and, under nvcc, CUDA's fp16/bf16 headers).
//
// 16-bit floats are stored as their bits (uint16_t). On the host the conversions are exact bit
// manipulations, branch-free so that loops over them vectorise; on the device they are CUDA's
// conversion instructions. Both round to nearest even, overflow to inf and keep NaN a NaN.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvpo/common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace kvpo {

enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

KVPO_HD int64_t element_size(DType d) {
  return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2;
}

namespace detail {

// The bits of `from` as a To (std::bit_cast of C++20; memcpy compiles to a register move, on the
// device too).
template <class To, class From>
KVPO_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

KVPO_HD float bits_to_float(uint32_t b) { return bit_cast<float>(b); }
KVPO_HD uint32_t float_to_bits(float f) { return bit_cast<uint32_t>(f); }

// All-ones when `cond`, else zero: selects written as bit masks stay branch-free (the compiler
// will not if-convert a select whose arms hold float arithmetic that may trap).
KVPO_HD uint32_t mask_if(bool cond) { return 0u - static_cast<uint32_t>(cond); }

KVPO_HD uint32_t select(uint32_t mask, uint32_t if_set, uint32_t if_clear) {
  return (if_set & mask) | (if_clear & ~mask);
}

}  // namespace detail

// IEEE binary16 -> binary32, exact. Host: the 15 magnitude bits move to the float's
// exponent/mantissa positions and the exponent is rebiased (+112); exponent 31 (inf, NaN) gets a
// second +112 (to 255); a subnormal m * 2^-24 becomes 2^-14 * (1 + m / 1024) by setting the
// exponent to 113, and subtracting 2^-14 leaves exactly m * 2^-24.
KVPO_HD float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  using namespace detail;
  uint32_t magnitude = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  const uint32_t exponent = magnitude & (0x1Fu << 23);
  magnitude += 112u << 23;
  magnitude += mask_if(exponent == (0x1Fu << 23)) & (112u << 23);
  const uint32_t subnormal = mask_if(exponent == 0);
  magnitude += subnormal & (1u << 23);
  const float value = bits_to_float(magnitude) - bits_to_float(subnormal & (113u << 23));
  return bits_to_float(float_to_bits(value) | (static_cast<uint32_t>(h & 0x8000u) << 16));
#endif
}

// binary32 -> binary16, round to nearest even; overflow to inf, NaN to the quiet NaN 0x7E00.
KVPO_HD uint16_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  using namespace detail;
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7FFFFFFFu;
  // |f| in [2^-14, 65520): rebias the exponent and round away the 13 low mantissa bits; a carry
  // out of the mantissa correctly bumps the exponent.
  const uint32_t rebiased = a - (112u << 23);
  const uint32_t normal = (rebiased + 0xFFFu + ((rebiased >> 13) & 1u)) >> 13;
  // |f| < 2^-14: adding 0.5 (ulp 2^-24) rounds |f| to a multiple of 2^-24 that lands in the low
  // mantissa bits.
  const uint32_t subnormal = float_to_bits(bits_to_float(a) + 0.5f) - 0x3F000000u;
  uint32_t out = select(mask_if(a < 0x38800000u), subnormal, normal);
  out = select(mask_if(a >= 0x477FF000u), 0x7C00u, out);  // 65520 and above round to inf
  out = select(mask_if(a > 0x7F800000u), 0x7E00u, out);   // NaN
  return static_cast<uint16_t>(sign | out);
#endif
}

KVPO_HD float bf16_to_float(uint16_t h) {
  return detail::bits_to_float(static_cast<uint32_t>(h) << 16);
}

// binary32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
KVPO_HD uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  using namespace detail;
  const uint32_t x = float_to_bits(f);
  const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  const uint32_t nan = mask_if((x & 0x7FFFFFFFu) > 0x7F800000u);
  return static_cast<uint16_t>(select(nan, (x >> 16) | 0x40u, rounded));
#endif
}

// Element traits: storage type T, accumulator Acc (double for F64, float otherwise), and the
// conversions load (T -> Acc), store (Acc -> T, rounded once) and negate (exact, on T).
template <DType D>
struct Elem;

template <class Float>
struct NativeElem {
  using T = Float;
  using Acc = Float;
  static KVPO_HD Acc load(T v) { return v; }
  static KVPO_HD T store(Acc v) { return v; }
  static KVPO_HD T negate(T v) { return -v; }
};

template <bool BFloat>
struct Float16Elem {
  using T = uint16_t;
  using Acc = float;
  static KVPO_HD Acc load(T v) { return BFloat ? bf16_to_float(v) : half_to_float(v); }
  static KVPO_HD T store(Acc v) { return BFloat ? float_to_bf16(v) : float_to_half(v); }
  static KVPO_HD T negate(T v) { return static_cast<T>(v ^ 0x8000u); }
};

template <>
struct Elem<DType::F32> : NativeElem<float> {};
template <>
struct Elem<DType::F64> : NativeElem<double> {};
template <>
struct Elem<DType::F16> : Float16Elem<false> {};
template <>
struct Elem<DType::BF16> : Float16Elem<true> {};

template <DType D>
using DTypeTag = std::integral_constant<DType, D>;

// Calls fn(DTypeTag<d>{}) (host only): fn is a generic lambda that reads the type as
// `decltype(tag)::value`, so one call site instantiates a kernel for every dtype.
template <class Fn>
inline void visit_dtype(DType d, Fn&& fn) {
  switch (d) {
    case DType::F32: fn(DTypeTag<DType::F32>{}); return;
    case DType::F16: fn(DTypeTag<DType::F16>{}); return;
    case DType::BF16: fn(DTypeTag<DType::BF16>{}); return;
    case DType::F64: fn(DTypeTag<DType::F64>{}); return;
  }
}

}  // namespace kvpo
