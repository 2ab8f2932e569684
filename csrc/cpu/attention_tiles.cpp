// Tile primitives of the CPU attention kernels (see kvpo/attention_tiles.h): a portable C++
// version and an AVX-512 version (compiled with a target attribute, chosen at run time).
#include "kvpo/attention_tiles.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVPO_HAVE_AVX512 1
#include <immintrin.h>
#define KVPO_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")))
#endif

namespace kvpo {
namespace {

// ---- portable C++ --------------------------------------------------------------------------

void gemm_generic(int64_t M, int64_t N, int64_t K, const float* const* a_rows, int64_t a_col,
                  const float* const* b_rows, float* c, int64_t ldc, bool accumulate,
                  const float* row_scale) {
  for (int64_t i = 0; i < M; ++i) {
    float* ci = c + i * ldc;
    const float s = accumulate ? (row_scale ? row_scale[i] : 1.0f) : 0.0f;
    for (int64_t n = 0; n < N; ++n) ci[n] = s == 0.0f ? 0.0f : ci[n] * s;
    for (int64_t k = 0; k < K; ++k) {
      const float aik = a_rows[i][k * a_col];
      const float* bk = b_rows[k];
      for (int64_t n = 0; n < N; ++n) ci[n] += aik * bk[n];
    }
  }
}

void softmax_step_generic(float* st, int64_t rows, int64_t lanes, float* m, float* l,
                          float* alpha) {
  for (int64_t c = 0; c < lanes; ++c) {
    float mx = m[c];
    for (int64_t r = 0; r < rows; ++r) mx = std::max(mx, st[r * lanes + c]);
    alpha[c] = std::exp2(m[c] - mx);  // exp2(-inf) = 0 on the first block
    m[c] = mx;
    float sum = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
      const float p = std::exp2(st[r * lanes + c] - mx);
      st[r * lanes + c] = p;
      sum += p;
    }
    l[c] = l[c] * alpha[c] + sum;
  }
}

void exp2_minus_lane_generic(float* x, int64_t rows, int64_t lanes, const float* shift) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < lanes; ++c) x[r * lanes + c] = std::exp2(x[r * lanes + c] - shift[c]);
}

void exp2_minus_row_generic(float* x, int64_t rows, int64_t lanes, const float* shift) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < lanes; ++c) x[r * lanes + c] = std::exp2(x[r * lanes + c] - shift[r]);
}

void load_row_generic(DType type, const void* src, int64_t n, int64_t padded, float scale,
                      float* dst) {
  visit_dtype(type, [&](auto d) {
    using E = Elem<decltype(d)::value>;
    const auto* s = static_cast<const typename E::T*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = scale * static_cast<float>(E::load(s[i]));
  });
  for (int64_t i = n; i < padded; ++i) dst[i] = 0.0f;
}

void store_row_generic(DType type, const float* src, int64_t n, float scale, void* dst) {
  visit_dtype(type, [&](auto d) {
    using E = Elem<decltype(d)::value>;
    auto* out = static_cast<typename E::T*>(dst);
    for (int64_t i = 0; i < n; ++i) out[i] = E::store(scale * src[i]);
  });
}

// ---- AVX-512 -------------------------------------------------------------------------------

#ifdef KVPO_HAVE_AVX512

// 2^x: x = n + f with n = round(x), f in [-1/2, 1/2]; 2^f by a degree-6 minimax polynomial
// (relative error 3e-9 before rounding), 2^n by vscalefps. x <= -150 (and -inf) gives 0.
KVPO_AVX512 inline __m512 exp2_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-150.0f)), _mm512_set1_ps(128.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5469732170458883e-04f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3400432653725147e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6180252730846405e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503271520137787e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650718688965e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718246459961e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One MR x (16 NV) tile of C, kept in registers over the whole K loop; B's columns n0 ...
template <int MR, int NV>
KVPO_AVX512 void gemm_tile(int64_t K, const float* const* a_rows, int64_t a_col,
                           const float* const* b_rows, int64_t n0, float* c, int64_t ldc,
                           bool accumulate, const float* row_scale) {
  __m512 acc[MR][NV];
  const float* a[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    a[i] = a_rows[i];
    const __m512 s = _mm512_set1_ps(row_scale ? row_scale[i] : 1.0f);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[i][v] = accumulate ? _mm512_mul_ps(_mm512_loadu_ps(c + i * ldc + 16 * v), s)
                             : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b_rows[k] + n0;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(bk + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i][k * a_col]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + 16 * v, acc[i][v]);
}

constexpr int kTileRows = 6;  // MR: 6 rows x 4 vectors = 24 accumulators of the 32 registers
constexpr int kTileVecs = 4;

using TileFn = void (*)(int64_t, const float* const*, int64_t, const float* const*, int64_t,
                        float*, int64_t, bool, const float*);

template <int MR>
constexpr TileFn tile_for(int nv) {
  return nv == 1 ? gemm_tile<MR, 1> : nv == 2 ? gemm_tile<MR, 2> : nv == 3 ? gemm_tile<MR, 3>
                                                                            : gemm_tile<MR, 4>;
}

TileFn tile_table(int mr, int nv) {
  static const TileFn table[kTileRows][kTileVecs] = {
      {tile_for<1>(1), tile_for<1>(2), tile_for<1>(3), tile_for<1>(4)},
      {tile_for<2>(1), tile_for<2>(2), tile_for<2>(3), tile_for<2>(4)},
      {tile_for<3>(1), tile_for<3>(2), tile_for<3>(3), tile_for<3>(4)},
      {tile_for<4>(1), tile_for<4>(2), tile_for<4>(3), tile_for<4>(4)},
      {tile_for<5>(1), tile_for<5>(2), tile_for<5>(3), tile_for<5>(4)},
      {tile_for<6>(1), tile_for<6>(2), tile_for<6>(3), tile_for<6>(4)},
  };
  return table[mr - 1][nv - 1];
}

void gemm_avx512(int64_t M, int64_t N, int64_t K, const float* const* a_rows, int64_t a_col,
                 const float* const* b_rows, float* c, int64_t ldc, bool accumulate,
                 const float* row_scale) {
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kTileVecs) {
    const int nv = int(std::min<int64_t>(kTileVecs, (N - n0) / 16));
    for (int64_t i0 = 0; i0 < M; i0 += kTileRows) {
      const int mr = int(std::min<int64_t>(kTileRows, M - i0));
      tile_table(mr, nv)(K, a_rows + i0, a_col, b_rows, n0, c + i0 * ldc + n0, ldc, accumulate,
                         row_scale ? row_scale + i0 : nullptr);
    }
  }
}

KVPO_AVX512 void softmax_step_avx512(float* st, int64_t rows, int64_t lanes, float* m, float* l,
                                     float* alpha) {
  for (int64_t c = 0; c < lanes; c += 16) {
    const __m512 m_old = _mm512_loadu_ps(m + c);
    __m512 mx = m_old;
    for (int64_t r = 0; r < rows; ++r) mx = _mm512_max_ps(mx, _mm512_loadu_ps(st + r * lanes + c));
    const __m512 a = exp2_ps(_mm512_sub_ps(m_old, mx));  // m_old = -inf: exp2 clamps to 0
    __m512 sum = _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(st + r * lanes + c), mx));
      _mm512_storeu_ps(st + r * lanes + c, p);
      sum = _mm512_add_ps(sum, p);
    }
    _mm512_storeu_ps(alpha + c, a);
    _mm512_storeu_ps(m + c, mx);
    _mm512_storeu_ps(l + c, _mm512_fmadd_ps(_mm512_loadu_ps(l + c), a, sum));
  }
}

KVPO_AVX512 void exp2_minus_lane_avx512(float* x, int64_t rows, int64_t lanes,
                                        const float* shift) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < lanes; c += 16) {
      float* p = x + r * lanes + c;
      _mm512_storeu_ps(p, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(shift + c))));
    }
}

KVPO_AVX512 void exp2_minus_row_avx512(float* x, int64_t rows, int64_t lanes, const float* shift) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 s = _mm512_set1_ps(shift[r]);
    for (int64_t c = 0; c < lanes; c += 16) {
      float* p = x + r * lanes + c;
      _mm512_storeu_ps(p, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(p), s)));
    }
  }
}

KVPO_AVX512 inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xffff) : __mmask16((1u << remaining) - 1u);
}

KVPO_AVX512 void load_row_avx512(DType type, const void* src, int64_t n, int64_t padded,
                                 float scale, float* dst) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < padded; i += 16) {
    const __mmask16 k = i < n ? tail_mask(n - i) : __mmask16(0);
    __m512 v;
    if (type == DType::F32) {
      v = _mm512_maskz_loadu_ps(k, static_cast<const float*>(src) + i);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(src) + i);
      v = type == DType::F16
              ? _mm512_cvtph_ps(h)
              : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    _mm512_storeu_ps(dst + i, _mm512_mul_ps(v, s));  // padded is a multiple of 16
  }
}

KVPO_AVX512 void store_row_avx512(DType type, const float* src, int64_t n, float scale,
                                  void* dst) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, src + i), s);
    if (type == DType::F32) {
      _mm512_mask_storeu_ps(static_cast<float*>(dst) + i, k, v);
      continue;
    }
    __m256i h;
    if (type == DType::F16) {
      h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {  // bf16: round to nearest even on the bits, NaN kept quiet
      const __m512i u = _mm512_castps_si512(v);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
      r = _mm512_srli_epi32(r, 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
      h = _mm512_cvtepi32_epi16(r);
    }
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(dst) + i, k, h);
  }
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

#endif  // KVPO_HAVE_AVX512

const TileOps kGeneric{gemm_generic,           softmax_step_generic, exp2_minus_lane_generic,
                       exp2_minus_row_generic, load_row_generic,     store_row_generic,
                       "generic"};

#ifdef KVPO_HAVE_AVX512
const TileOps kAvx512{gemm_avx512,           softmax_step_avx512, exp2_minus_lane_avx512,
                      exp2_minus_row_avx512, load_row_avx512,     store_row_avx512,
                      "avx512"};
#endif

}  // namespace

const TileOps& tile_ops() {
  const char* forced = std::getenv("KVPO_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return kGeneric;
#ifdef KVPO_HAVE_AVX512
  static const bool avx512 = cpu_has_avx512();
  if (avx512) return kAvx512;
#endif
  return kGeneric;
}

}  // namespace kvpo
