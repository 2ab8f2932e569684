// OpenMP CPU kernels of the TVE energy (see kvpo/tve.h). No torch headers: pointers, sizes and
// strides only; fp16/bf16 conversions and element traits from kvpo/dtype.h.
//
// Work units (item, chunk) are spread over threads. Inside a unit the elements are walked as
// runs along the innermost item dim; each run is accumulated into 16 fixed lanes (lane = position
// in the run mod 16), which fixes the summation order whatever the vector width the compiler
// picks, so the hot loops are compiled for x86-64-v4 (AVX-512), v3 (AVX2) and baseline x86-64
// (chosen at load time) and give the same bits on each.
#include <algorithm>

#include "kvpo/tve.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KVPO_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVPO_VECTOR_CLONES
#endif

namespace kvpo {
namespace {

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
template <DType D, class Index>
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
template <DType D, bool WithTarget, class Index>
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
template <DType D, class Visit>
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

template <DType D>
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

template <DType D>
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

}  // namespace

void tve_item_sq_sum_cpu(DType dtype, const TveShape& shape, const TveOperand& pred,
                         const TveOperand& target, void* partials, void* out) {
  visit_dtype(dtype, [&](auto d) {
    item_sq_sum<decltype(d)::value>(shape, pred, target, partials, out);
  });
}

void tve_item_sq_sum_backward_cpu(DType dtype, const TveShape& shape, const TveOperand& pred,
                                  const TveOperand& target, const void* coef, void* grad_pred,
                                  void* grad_target) {
  visit_dtype(dtype, [&](auto d) {
    item_sq_sum_backward<decltype(d)::value>(shape, pred, target, coef, grad_pred, grad_target);
  });
}

}  // namespace kvpo
