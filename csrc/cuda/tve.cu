// CUDA kernels of the TVE energy (see kvpo/tve.h). Includes only CUDA headers and kvpo headers,
// so that `nvcc -c` compiles it without a CUDA build of torch (tools/check_cuda_compile.sh).
//
// One block per work unit (item, chunk of kTveChunkCuda elements). Stage 1 reduces a chunk with
// per-thread fp32 (fp64) accumulators and a fixed shuffle tree; stage 2 sums an item's partials
// with one warp per item in a fixed order. The backward writes each chunk's gradient.
#include <cuda_runtime.h>

#include "kvpo/tve.h"

namespace kvpo {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;

template <class Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, valid in thread 0; the tree is fixed, so the result is deterministic.
template <class Acc>
__device__ __forceinline__ Acc block_sum(Acc v) {
  __shared__ Acc warp_sums[kWarps];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x < kWarps ? warp_sums[threadIdx.x] : Acc(0);
  return threadIdx.x < 32 ? warp_sum(v) : v;
}

struct WorkUnit {
  int64_t item, lo, hi;
};

__device__ __forceinline__ WorkUnit work_unit(const TveShape& s) {
  const int64_t w = blockIdx.x;
  const int64_t item = w / s.n_chunks;
  const int64_t lo = (w % s.n_chunks) * s.chunk;
  const int64_t hi = lo + s.chunk < s.numel ? lo + s.chunk : s.numel;
  return WorkUnit{item, lo, hi};
}

// partials[w] = sum over work unit w of (p - t)^2.
template <DType D>
__global__ void __launch_bounds__(kThreads)
    sq_sum_partials_kernel(TveShape s, TveOperand p, TveOperand t,
                           typename Elem<D>::Acc* __restrict__ partials) {
  using E = Elem<D>;
  using T = typename E::T;
  using Acc = typename E::Acc;
  const WorkUnit u = work_unit(s);
  const int64_t g = u.item / s.items, k = u.item % s.items;
  const T* __restrict__ pi = static_cast<const T*>(p.data) + tve_item_offset(p, g, k);
  const T* __restrict__ ti = static_cast<const T*>(t.data) + tve_item_offset(t, g, k);
  Acc acc = 0;
  if (tve_item_contiguous(p, s) && tve_item_contiguous(t, s)) {
    // kUnroll independent loads per operand in flight per thread
    for (int64_t base = u.lo + threadIdx.x; base < u.hi; base += kUnroll * kThreads) {
      Acc x[kUnroll], y[kUnroll];
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const int64_t i = base + j * kThreads;
        x[j] = i < u.hi ? E::load(pi[i]) : Acc(0);
        y[j] = i < u.hi ? E::load(ti[i]) : Acc(0);
      }
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const Acc d = x[j] - y[j];
        acc += d * d;
      }
    }
  } else {
    for (int64_t i = u.lo + threadIdx.x; i < u.hi; i += kThreads) {
      const Acc d =
          E::load(pi[tve_element_offset(p, s, i)]) - E::load(ti[tve_element_offset(t, s, i)]);
      acc += d * d;
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// out[item] = sum_j partials[item * n_chunks + j]; one warp per item.
template <class Acc>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const Acc* __restrict__ partials, Acc* __restrict__ out, int64_t n_items,
                        int64_t n_chunks) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= n_items) return;
  Acc acc = 0;
  for (int64_t j = threadIdx.x % 32; j < n_chunks; j += 32) acc += partials[item * n_chunks + j];
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) out[item] = acc;
}

// grad_p[item, i] = round((p - t) * 2 coef[item]); grad_t = -grad_p when WithTarget.
template <DType D, bool WithTarget>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(TveShape s, TveOperand p, TveOperand t,
                    const typename Elem<D>::Acc* __restrict__ coef,
                    typename Elem<D>::T* __restrict__ grad_p,
                    typename Elem<D>::T* __restrict__ grad_t) {
  using E = Elem<D>;
  using T = typename E::T;
  using Acc = typename E::Acc;
  const WorkUnit u = work_unit(s);
  const int64_t g = u.item / s.items, k = u.item % s.items;
  const T* __restrict__ pi = static_cast<const T*>(p.data) + tve_item_offset(p, g, k);
  const T* __restrict__ ti = static_cast<const T*>(t.data) + tve_item_offset(t, g, k);
  const Acc scale = 2 * coef[u.item];
  const bool contiguous = tve_item_contiguous(p, s) && tve_item_contiguous(t, s);
  T* gp = grad_p + u.item * s.numel;
  T* gt = WithTarget ? grad_t + u.item * s.numel : nullptr;
  for (int64_t i = u.lo + threadIdx.x; i < u.hi; i += kThreads) {
    const int64_t po = contiguous ? i : tve_element_offset(p, s, i);
    const int64_t to = contiguous ? i : tve_element_offset(t, s, i);
    const T grad = E::store((E::load(pi[po]) - E::load(ti[to])) * scale);
    gp[i] = grad;
    if (WithTarget) gt[i] = E::negate(grad);
  }
}

template <DType D>
void launch_forward(const TveShape& s, const TveOperand& p, const TveOperand& t, void* partials,
                    void* out, cudaStream_t stream) {
  using Acc = typename Elem<D>::Acc;
  const int64_t n_items = s.groups * s.items;
  sq_sum_partials_kernel<D><<<static_cast<unsigned>(n_items * s.n_chunks), kThreads, 0, stream>>>(
      s, p, t, static_cast<Acc*>(partials));
  const unsigned blocks = static_cast<unsigned>((n_items + kWarps - 1) / kWarps);
  sum_partials_kernel<Acc><<<blocks, kThreads, 0, stream>>>(
      static_cast<const Acc*>(partials), static_cast<Acc*>(out), n_items, s.n_chunks);
}

template <DType D>
void launch_backward(const TveShape& s, const TveOperand& p, const TveOperand& t,
                     const void* coef, void* grad_p, void* grad_t, cudaStream_t stream) {
  using E = Elem<D>;
  const unsigned blocks = static_cast<unsigned>(s.groups * s.items * s.n_chunks);
  const auto* c = static_cast<const typename E::Acc*>(coef);
  auto* gp = static_cast<typename E::T*>(grad_p);
  auto* gt = static_cast<typename E::T*>(grad_t);
  if (grad_t != nullptr) {
    backward_kernel<D, true><<<blocks, kThreads, 0, stream>>>(s, p, t, c, gp, gt);
  } else {
    backward_kernel<D, false><<<blocks, kThreads, 0, stream>>>(s, p, t, c, gp, gt);
  }
}

}  // namespace

void tve_item_sq_sum_cuda(DType dtype, const TveShape& shape, const TveOperand& pred,
                          const TveOperand& target, void* partials, void* out, void* stream) {
  if (shape.groups * shape.items * shape.numel == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(dtype, [&](auto d) {
    launch_forward<decltype(d)::value>(shape, pred, target, partials, out, s);
  });
}

void tve_item_sq_sum_backward_cuda(DType dtype, const TveShape& shape, const TveOperand& pred,
                                   const TveOperand& target, const void* coef, void* grad_pred,
                                   void* grad_target, void* stream) {
  if (shape.groups * shape.items * shape.numel == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(dtype, [&](auto d) {
    launch_backward<decltype(d)::value>(shape, pred, target, coef, grad_pred, grad_target, s);
  });
}

}  // namespace kvpo
