// Tile primitives of the CPU attention kernels: small fp32 GEMMs on L1/L2-resident tiles, the
// exp2 steps of the softmax, element conversions. One implementation per instruction set
// (AVX-512 and portable C++), picked at run time by tile_ops().
#pragma once
#include <cstdint>

#include "kvpo/routed_attention.h"

namespace kvpo {

struct TileOps {
  // C[M, N] = row_scale[i] * C[M, N] + A @ B   (accumulate; row_scale may be null = 1)
  // C[M, N] = A @ B                           (!accumulate)
  // A(i, k) = a_rows[i][k * a_col]; B(k, n) = b_rows[k][n]; C(i, n) = c[i * ldc + n].
  // Operands are row pointers so that rows can be read where they lie (pages, inputs) or from
  // tiles. N must be a multiple of 16; B's rows must be readable up to N.
  void (*gemm)(int64_t M, int64_t N, int64_t K, const float* const* a_rows, int64_t a_col,
               const float* const* b_rows, float* c, int64_t ldc, bool accumulate,
               const float* row_scale);

  // One online-softmax step over a block of keys held as rows of st [rows, lanes] (log2 units,
  // one lane per query; lanes % 16 == 0): m = max(m, column max), alpha = exp2(m_old - m),
  // st = exp2(st - m), l = alpha * l + column sum.
  void (*softmax_step)(float* st, int64_t rows, int64_t lanes, float* m, float* l, float* alpha);

  // x[r, c] = exp2(x[r, c] - shift[c])  (per lane)   for r < rows, c < lanes (lanes % 16 == 0)
  void (*exp2_minus_lane)(float* x, int64_t rows, int64_t lanes, const float* shift);

  // x[r, c] = exp2(x[r, c] - shift[r])  (per row)
  void (*exp2_minus_row)(float* x, int64_t rows, int64_t lanes, const float* shift);

  // dst[i] = scale * float(src[i]) for i < n; dst[i] = 0 for n <= i < padded
  void (*load_row)(DType type, const void* src, int64_t n, int64_t padded, float scale,
                   float* dst);

  // dst[i] = type(scale * src[i]) for i < n (round to nearest even)
  void (*store_row)(DType type, const float* src, int64_t n, float scale, void* dst);

  const char* name;
};

// AVX-512 when the CPU has it (and $KVPO_CPU_ISA is not "generic"), else portable C++.
const TileOps& tile_ops();

}  // namespace kvpo
