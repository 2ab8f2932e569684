// Trajectory Velocity Energy (TVE) kernels, shared declarations and index math.
//
// Inputs pred and target are [G, K, A, B, C] strided views (element strides; the Python side
// coalesces [G, K, *S] into at most three item dims). Item (g, k) has N = A * B * C elements in
// row-major order over (a, b, c). Each item is cut into chunks of `chunk` elements; a work unit
// is one (item, chunk) pair, w = (g * K + k) * n_chunks + chunk.
//
// Forward (two stages, deterministic, no atomics):
//   partials[w] = sum over the chunk of (pred - target)^2           (stage 1, Acc accumulator)
//   out[g, k]   = sum_j partials[(g * K + k) * n_chunks + j]        (stage 2, j in order)
// Backward: grad_pred[g, k, i] = round((pred - target) * (2 * coef[g, k])), computed in Acc and
// rounded once to the input dtype; grad_target = -grad_pred. Gradients are contiguous [G, K, N].
// Acc is double for F64 inputs and float otherwise.
#pragma once
#include <cstdint>

#include "kvpo/common.h"
#include "kvpo/dtype.h"

namespace kvpo {

struct TveOperand {
  const void* data;    // element (0, 0, 0, 0, 0)
  int64_t stride_g;    // element strides of the [G, K, A, B, C] view
  int64_t stride_k;
  int64_t stride_a;
  int64_t stride_b;
  int64_t stride_c;
};

struct TveShape {
  int64_t groups;    // G
  int64_t items;     // K
  int64_t size_b;    // B (A is numel / (B * C))
  int64_t size_c;    // C
  int64_t numel;     // N = A * B * C elements per item
  int64_t chunk;     // elements per work unit
  int64_t n_chunks;  // ceil(N / chunk)
};

// Elements per work unit of the CPU and CUDA kernels.
constexpr int64_t kTveChunkCpu = 1 << 15;
constexpr int64_t kTveChunkCuda = 1 << 13;

KVPO_HD int64_t tve_chunks(int64_t numel, int64_t chunk) { return (numel + chunk - 1) / chunk; }

// Element offset of item (g, k).
KVPO_HD int64_t tve_item_offset(const TveOperand& x, int64_t g, int64_t k) {
  return g * x.stride_g + k * x.stride_k;
}

// Element offset of linear position i inside an item.
KVPO_HD int64_t tve_element_offset(const TveOperand& x, const TveShape& s, int64_t i) {
  const int64_t c = i % s.size_c;
  const int64_t row = i / s.size_c;
  return (row / s.size_b) * x.stride_a + (row % s.size_b) * x.stride_b + c * x.stride_c;
}

// True when every item of x is one contiguous run (the kernels' fast path).
KVPO_HD bool tve_item_contiguous(const TveOperand& x, const TveShape& s) {
  return x.stride_c == 1 && s.numel == s.size_c;
}

// Stage 1 + 2 of the forward on the CPU (OpenMP). partials: [G * K * n_chunks] Acc workspace,
// out: [G, K] Acc.
void tve_item_sq_sum_cpu(DType dtype, const TveShape& shape, const TveOperand& pred,
                         const TveOperand& target, void* partials, void* out);

// Backward on the CPU. coef: [G, K] Acc contiguous; grad_target may be null.
void tve_item_sq_sum_backward_cpu(DType dtype, const TveShape& shape, const TveOperand& pred,
                                  const TveOperand& target, const void* coef, void* grad_pred,
                                  void* grad_target);

#ifdef KVPO_WITH_CUDA
void tve_item_sq_sum_cuda(DType dtype, const TveShape& shape, const TveOperand& pred,
                          const TveOperand& target, void* partials, void* out, void* stream);

void tve_item_sq_sum_backward_cuda(DType dtype, const TveShape& shape, const TveOperand& pred,
                                   const TveOperand& target, const void* coef, void* grad_pred,
                                   void* grad_target, void* stream);
#endif

}  // namespace kvpo
