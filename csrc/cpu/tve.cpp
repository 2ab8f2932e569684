// OpenMP CPU kernels of the TVE energy (see kvpo/tve.h). No torch headers: pointers, sizes and
// strides only; fp16/bf16 are converted by hand.
//
// Work units (item, chunk) are spread over threads. Inside a unit the elements are walked as
// runs along the innermost item dim; each run is accumulated into 16 fixed lanes (lane = position
// in the run mod 16), which fixes the summation order whatever the vector width the compiler
// picks, so the hot loops are compiled for x86-64-v4 (AVX-512), v3 (AVX2) and baseline x86-64
// (chosen at load time) and give the same bits on each.
#include <algorithm>
#include <cstring>

#include "kvpo/tve.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KVPO_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVPO_VECTOR_CLONES
#endif

namespace kvpo {
namespace {

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// All-ones when `cond`, else zero: selects written as bit masks stay branch-free (the compiler
// will not if-convert a select whose arms hold float arithmetic that may trap).
inline uint32_t mask_if(bool cond) { return 0u - static_cast<uint32_t>(cond); }

inline uint32_t select(uint32_t mask, uint32_t if_set, uint32_t if_clear) {
  return (if_set & mask) | (if_clear & ~mask);
}

// IEEE binary16 -> binary32, exact for every finite input. The 15 magnitude bits move to the
// float's exponent/mantissa positions and the exponent is rebiased (+112); exponent 31 (inf, NaN)
// gets a second +112 (to 255); a subnormal m * 2^-24 becomes 2^-14 * (1 + m / 1024) by setting
// the exponent to 113, and subtracting 2^-14 leaves exactly m * 2^-24.
inline float half_to_float(uint16_t h) {
  uint32_t magnitude = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  const uint32_t exponent = magnitude & (0x1Fu << 23);
  magnitude += 112u << 23;
  magnitude += mask_if(exponent == (0x1Fu << 23)) & (112u << 23);
  const uint32_t subnormal = mask_if(exponent == 0);
  magnitude += subnormal & (1u << 23);
  const float value = bits_to_float(magnitude) - bits_to_float(subnormal & (113u << 23));
  return bits_to_float(float_to_bits(value) | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// binary32 -> binary16, round to nearest even; overflow to inf, NaN to the quiet NaN 0x7E00.
inline uint16_t float_to_half(float f) {
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
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  const uint32_t nan = mask_if((x & 0x7FFFFFFFu) > 0x7F800000u);
  return static_cast<uint16_t>(select(nan, (x >> 16) | 0x40u, rounded));
}

// Storage type, accumulator and conversions per input dtype.
template <TveDType D>
struct Elem;
template <>
struct Elem<TveDType::F32> {
  using T = float;
  using Acc = float;
  static Acc load(T v) { return v; }
  static T store(Acc v) { return v; }
  static T negate(T v) { return -v; }
};
template <>
struct Elem<TveDType::F64> {
  using T = double;
  using Acc = double;
  static Acc load(T v) { return v; }
  static T store(Acc v) { return v; }
  static T negate(T v) { return -v; }
};
template <>
struct Elem<TveDType::F16> {
  using T = uint16_t;
  using Acc = float;
  static Acc load(T v) { return half_to_float(v); }
  static T store(Acc v) { return float_to_half(v); }
  static T negate(T v) { return v ^ 0x8000u; }
};
template <>
struct Elem<TveDType::BF16> {
  using T = uint16_t;
  using Acc = float;
  static Acc load(T v) { return bf16_to_float(v); }
  static T store(Acc v) { return float_to_bf16(v); }
  static T negate(T v) { return v ^ 0x8000u; }
};

constexpr int kLanes = 16;

// Element index policies of a run: unit stride (vectorisable) or a runtime stride.
struct UnitStride {
  int64_t operator()(int64_t i) const { return i; }
};
struct Stride {
  int64_t step;
  int64_t operator()(int64_t i) const { return i * step; }
};

// lanes[i % 16] += (p[i] - t[i])^2 for i < n.
template <TveDType D, class Index>
KVPO_VECTOR_CLONES void accumulate_run(typename Elem<D>::Acc* lanes, const typename Elem<D>::T* p,
                                       const typename Elem<D>::T* t, int64_t n, Index ip,
                                       Index it) {
  using E = Elem<D>;
  typename E::Acc acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = lanes[l];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const typename E::Acc d = E::load(p[ip(i + l)]) - E::load(t[it(i + l)]);
      acc[l] += d * d;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const typename E::Acc d = E::load(p[ip(i)]) - E::load(t[it(i)]);
    acc[l] += d * d;
  }
  for (int l = 0; l < kLanes; ++l) lanes[l] = acc[l];
}

// g[i] = round((p[i] - t[i]) * scale), and gt[i] = -g[i] when WithTarget, for i < n.
template <TveDType D, bool WithTarget, class Index>
KVPO_VECTOR_CLONES void write_grad_run(typename Elem<D>::T* gp, typename Elem<D>::T* gt,
                                       const typename Elem<D>::T* p,
                                       const typename Elem<D>::T* t, int64_t n, Index ip,
                                       Index it, typename Elem<D>::Acc scale) {
  using E = Elem<D>;
  for (int64_t i = 0; i < n; ++i) {
    const typename E::T g = E::store((E::load(p[ip(i)]) - E::load(t[it(i)])) * scale);
    gp[i] = g;
    if (WithTarget) gt[i] = E::negate(g);
  }
}

// Calls visit(p_run, t_run, offset_in_chunk, length, index_p, index_t) for each run of the
// elements [lo, hi) of item (g, k) along the innermost item dim.
template <TveDType D, class Visit>
void for_each_run(const TveShape& s, const TveOperand& p, const TveOperand& t, int64_t g,
                  int64_t k, int64_t lo, int64_t hi, Visit&& visit) {
  using T = typename Elem<D>::T;
  const T* p_item = static_cast<const T*>(p.data) + tve_item_offset(p, g, k);
  const T* t_item = static_cast<const T*>(t.data) + tve_item_offset(t, g, k);
  const bool unit = p.stride_c == 1 && t.stride_c == 1;
  for (int64_t i = lo; i < hi;) {
    const int64_t len = std::min(s.size_c - i % s.size_c, hi - i);
    const T* pr = p_item + tve_element_offset(p, s, i);
    const T* tr = t_item + tve_element_offset(t, s, i);
    if (unit) {
      visit(pr, tr, i - lo, len, UnitStride{}, UnitStride{});
    } else {
      visit(pr, tr, i - lo, len, Stride{p.stride_c}, Stride{t.stride_c});
    }
    i += len;
  }
}

template <TveDType D>
void item_sq_sum(const TveShape& s, const TveOperand& p, const TveOperand& t, void* partials_v,
                 void* out_v) {
  using Acc = typename Elem<D>::Acc;
  Acc* partials = static_cast<Acc*>(partials_v);
  Acc* out = static_cast<Acc*>(out_v);
  const int64_t n_items = s.groups * s.items;
  const int64_t work = n_items * s.n_chunks;
#pragma omp parallel for schedule(static) if (n_items * s.numel > (1 << 15))
  for (int64_t w = 0; w < work; ++w) {
    const int64_t item = w / s.n_chunks;
    const int64_t lo = (w % s.n_chunks) * s.chunk;
    Acc lanes[kLanes] = {};
    for_each_run<D>(s, p, t, item / s.items, item % s.items, lo, std::min(lo + s.chunk, s.numel),
                    [&](auto pr, auto tr, int64_t, int64_t len, auto ip, auto it) {
                      accumulate_run<D>(lanes, pr, tr, len, ip, it);
                    });
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    }
    partials[w] = lanes[0];
  }
  for (int64_t item = 0; item < n_items; ++item) {
    Acc total = 0;
    for (int64_t j = 0; j < s.n_chunks; ++j) total += partials[item * s.n_chunks + j];
    out[item] = total;
  }
}

template <TveDType D>
void item_sq_sum_backward(const TveShape& s, const TveOperand& p, const TveOperand& t,
                          const void* coef_v, void* grad_p_v, void* grad_t_v) {
  using E = Elem<D>;
  const typename E::Acc* coef = static_cast<const typename E::Acc*>(coef_v);
  typename E::T* grad_p = static_cast<typename E::T*>(grad_p_v);
  typename E::T* grad_t = static_cast<typename E::T*>(grad_t_v);
  const int64_t n_items = s.groups * s.items;
  const int64_t work = n_items * s.n_chunks;
#pragma omp parallel for schedule(static) if (n_items * s.numel > (1 << 15))
  for (int64_t w = 0; w < work; ++w) {
    const int64_t item = w / s.n_chunks;
    const int64_t lo = (w % s.n_chunks) * s.chunk;
    const typename E::Acc scale = 2 * coef[item];
    typename E::T* gp = grad_p + item * s.numel + lo;
    typename E::T* gt = grad_t ? grad_t + item * s.numel + lo : nullptr;
    for_each_run<D>(s, p, t, item / s.items, item % s.items, lo, std::min(lo + s.chunk, s.numel),
                    [&](auto pr, auto tr, int64_t at, int64_t len, auto ip, auto it) {
                      if (gt) {
                        write_grad_run<D, true>(gp + at, gt + at, pr, tr, len, ip, it, scale);
                      } else {
                        write_grad_run<D, false>(gp + at, nullptr, pr, tr, len, ip, it, scale);
                      }
                    });
  }
}

template <template <TveDType> class Fn, class... Args>
void dispatch(TveDType dtype, Args&&... args) {
  switch (dtype) {
    case TveDType::F32: return Fn<TveDType::F32>::run(args...);
    case TveDType::F16: return Fn<TveDType::F16>::run(args...);
    case TveDType::BF16: return Fn<TveDType::BF16>::run(args...);
    case TveDType::F64: return Fn<TveDType::F64>::run(args...);
  }
}

template <TveDType D>
struct Forward {
  template <class... Args>
  static void run(Args&&... args) { item_sq_sum<D>(args...); }
};

template <TveDType D>
struct Backward {
  template <class... Args>
  static void run(Args&&... args) { item_sq_sum_backward<D>(args...); }
};

}  // namespace

void tve_item_sq_sum_cpu(TveDType dtype, const TveShape& shape, const TveOperand& pred,
                         const TveOperand& target, void* partials, void* out) {
  dispatch<Forward>(dtype, shape, pred, target, partials, out);
}

void tve_item_sq_sum_backward_cpu(TveDType dtype, const TveShape& shape, const TveOperand& pred,
                                  const TveOperand& target, const void* coef, void* grad_pred,
                                  void* grad_target) {
  dispatch<Backward>(dtype, shape, pred, target, coef, grad_pred, grad_target);
}

}  // namespace kvpo
