// OpenMP CPU kernels of routed attention (see kvpo/routed_attention.h).
//
// Forward, per work item (row b, kv head, tile of queries; the G query heads of a kv head share
// the item so that each key block is loaded once for all of them):
//   Qt[D, M] = (scale * log2 e) * Q^T                      M = G * queries, one lane per query
//   for each block of keys (the row's cached tokens, looked up per token through its page list,
//   then its new tokens), converted to fp32 rows K_b, V_b:
//     S^T = K_b Qt;  m' = max(m, colmax S^T);  P^T = exp2(S^T - m');  l = l 2^(m - m') + colsum
//     O = diag(2^(m - m')) O + P V_b
//   out = O / l,  lse = (m + log2 l) ln 2
// Backward (FlashAttention-2 with recomputed probabilities, dS = P (dP - delta),
// delta = rowsum(dO * O) - dlse), in two passes:
//   1. per (row, kv head, query tile): dQ = scale sum_b dS_b K_b over all attended keys;
//   2. per (row, kv head, tile of new tokens): dV = P^T dO, dK = scale dS^T Q over all queries of
//      the kv head's G query heads. Cached tokens get no gradient, so their dK/dV are never formed.
#include "kvpo/routed_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kvpo/attention_tiles.h"

namespace kvpo {
namespace {

constexpr int64_t kKeyBlock = 96;    // keys per block (rows of S^T), a multiple of the GEMM's 6
constexpr int64_t kLaneTarget = 96;  // queries (all heads of a group) per work item, about
constexpr int64_t kQueryBlock = 64;  // queries per block in the backward's pass 2
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// Queries per work item: tiles of about kLaneTarget lanes (G heads x queries), equal in size.
int64_t queries_per_item(const RoutedAttentionShape& s) {
  const int64_t group = s.heads / s.kv_heads;
  const int64_t tiles = std::max<int64_t>(1, ceil_div(s.lq * group, kLaneTarget));
  return std::max<int64_t>(1, ceil_div(s.lq, tiles));
}

// Where the keys and values of one row and kv head come from: cached tokens then new tokens.
struct KeySource {
  const char* pages;
  const char* k_new;
  const char* v_new;
  const int32_t* table_row;
  int64_t ctx_len, total, kv_head, value_bytes;
  const PagedContext* ctx;
  const RoutedAttentionShape* shape;
  int64_t elem;

  KeySource(const RoutedAttentionShape& s, const PagedContext& c, int64_t elem_bytes,
            const void* k, const void* v, int64_t b, int64_t h)
      : pages(static_cast<const char*>(c.pages)),
        k_new(static_cast<const char*>(k) + ((b * s.ln) * s.kv_heads + h) * s.dim * elem_bytes),
        v_new(static_cast<const char*>(v) + ((b * s.ln) * s.kv_heads + h) * s.dim * elem_bytes),
        table_row(c.page_table + b * c.table_stride),
        ctx_len(c.ctx_lens[b]),
        total(c.ctx_lens[b] + s.ln),
        kv_head(h),
        value_bytes(value_offset(c, s.kv_heads, s.dim) * elem_bytes),
        ctx(&c),
        shape(&s),
        elem(elem_bytes) {}

  // Address of the key of token t (its value is at value_address).
  const char* key_address(int64_t t) const {
    if (t < ctx_len) {
      return pages + cached_key_offset(*ctx, table_row, t, shape->kv_heads, shape->dim, kv_head) *
                         elem;
    }
    return k_new + (t - ctx_len) * shape->kv_heads * shape->dim * elem;
  }
  const char* value_address(int64_t t) const {
    if (t < ctx_len) return key_address(t) + value_bytes;
    return v_new + (t - ctx_len) * shape->kv_heads * shape->dim * elem;
  }
};

// Keys [n, dp] and values [n, dp] of tokens t0 .. t0 + n - 1 as fp32 rows (zero-padded to dp).
void load_key_block(const TileOps& ops, ElemType type, const KeySource& src, int64_t t0,
                    int64_t n, int64_t dim, int64_t dp, float* keys, float* values) {
  for (int64_t j = 0; j < n; ++j) {
    ops.load_row(type, src.key_address(t0 + j), dim, dp, 1.0f, keys + j * dp);
    ops.load_row(type, src.value_address(t0 + j), dim, dp, 1.0f, values + j * dp);
  }
}

// Transposed, scaled copy of rows: dst[d, r] = scale * src_r[d] for r < rows, 0 for padding lanes.
void load_transposed(const TileOps& ops, ElemType type, const char* const* rows, int64_t count,
                     int64_t lanes, int64_t dim, int64_t dp, float scale, float* row_buffer,
                     float* dst) {
  for (int64_t r = 0; r < count; ++r) {
    ops.load_row(type, rows[r], dim, dp, scale, row_buffer);
    for (int64_t d = 0; d < dp; ++d) dst[d * lanes + r] = row_buffer[d];
  }
  for (int64_t d = 0; d < dp; ++d)
    for (int64_t r = count; r < lanes; ++r) dst[d * lanes + r] = 0.0f;
}

// The query rows of one work item: lane r = g * nq + i is head kv_head * G + g, query q0 + i.
struct QueryTile {
  int64_t b, kv_head, q0, nq, lanes, padded;
  QueryTile(const RoutedAttentionShape& s, int64_t item, int64_t per_item) {
    const int64_t tiles = ceil_div(s.lq, per_item);
    b = item / (s.kv_heads * tiles);
    kv_head = (item / tiles) % s.kv_heads;
    q0 = (item % tiles) * per_item;
    nq = std::min(per_item, s.lq - q0);
    lanes = (s.heads / s.kv_heads) * nq;
    padded = round_up(lanes, 16);
  }
  int64_t head(const RoutedAttentionShape& s, int64_t lane) const {
    return kv_head * (s.heads / s.kv_heads) + lane / nq;
  }
  int64_t query(int64_t lane) const { return q0 + lane % nq; }
  // Element offset of (b, query, head) in a [B, Lq, H, D] tensor.
  int64_t offset(const RoutedAttentionShape& s, int64_t lane) const {
    return ((b * s.lq + query(lane)) * s.heads + head(s, lane)) * s.dim;
  }
  int64_t lse_index(const RoutedAttentionShape& s, int64_t lane) const {
    return (b * s.heads + head(s, lane)) * s.lq + query(lane);
  }
};

int64_t query_items(const RoutedAttentionShape& s) {
  return s.batch * s.kv_heads * ceil_div(s.lq, queries_per_item(s));
}

}  // namespace

void routed_attention_forward_cpu(const RoutedAttentionShape& s, ElemType type,
                                  const PagedContext& ctx, const RoutedAttentionForwardArgs& args,
                                  float scale) {
  const TileOps& ops = tile_ops();
  const int64_t elem = element_size(type), dp = round_up(s.dim, 16);
  const int64_t per_item = queries_per_item(s), items = query_items(s);
  const int64_t max_lanes = round_up((s.heads / s.kv_heads) * per_item, 16);
  const char* q = static_cast<const char*>(args.q);
  char* out = static_cast<char*>(args.out);
#pragma omp parallel if (items > 1)
  {
    std::vector<float> qt(dp * max_lanes), o(max_lanes * dp), st(kKeyBlock * max_lanes);
    std::vector<float> keys(kKeyBlock * dp), values(kKeyBlock * dp), row(dp);
    std::vector<float> m(max_lanes), l(max_lanes), alpha(max_lanes);
    std::vector<const char*> rows(max_lanes);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const QueryTile tile(s, item, per_item);
      const KeySource src(s, ctx, elem, args.k_new, args.v_new, tile.b, tile.kv_head);
      for (int64_t r = 0; r < tile.lanes; ++r) rows[r] = q + tile.offset(s, r) * elem;
      load_transposed(ops, type, rows.data(), tile.lanes, tile.padded, s.dim, dp,
                      scale * kLog2e, row.data(), qt.data());
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(o.begin(), o.begin() + tile.lanes * dp, 0.0f);
      for (int64_t t0 = 0; t0 < src.total; t0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, src.total - t0);
        load_key_block(ops, type, src, t0, n, s.dim, dp, keys.data(), values.data());
        ops.gemm(n, tile.padded, dp, keys.data(), dp, 1, qt.data(), tile.padded, st.data(),
                 tile.padded, false, nullptr);
        ops.softmax_step(st.data(), n, tile.padded, m.data(), l.data(), alpha.data());
        ops.gemm(tile.lanes, dp, n, st.data(), 1, tile.padded, values.data(), dp, o.data(), dp,
                 true, alpha.data());
      }
      for (int64_t r = 0; r < tile.lanes; ++r) {
        const bool empty = !(l[r] > 0.0f);
        ops.store_row(type, o.data() + r * dp, s.dim, empty ? 0.0f : 1.0f / l[r],
                      out + tile.offset(s, r) * elem);
        args.lse[tile.lse_index(s, r)] =
            empty ? -std::numeric_limits<float>::infinity() : (m[r] + std::log2(l[r])) * kLn2;
      }
    }
  }
}

namespace {

// Backward pass 1: dQ of every query over all its keys; also writes delta = rowsum(dO O) - dlse.
void backward_queries(const TileOps& ops, const RoutedAttentionShape& s, ElemType type,
                      const PagedContext& ctx, const RoutedAttentionBackwardArgs& args,
                      float scale, float* delta_out) {
  const int64_t elem = element_size(type), dp = round_up(s.dim, 16);
  const int64_t per_item = queries_per_item(s), items = query_items(s);
  const int64_t max_lanes = round_up((s.heads / s.kv_heads) * per_item, 16);
  const char* q = static_cast<const char*>(args.q);
  const char* dout = static_cast<const char*>(args.dout);
  const char* out = static_cast<const char*>(args.out);
#pragma omp parallel if (items > 1)
  {
    std::vector<float> qt(dp * max_lanes), dot(dp * max_lanes), dq(max_lanes * dp);
    std::vector<float> st(kKeyBlock * max_lanes), dpt(kKeyBlock * max_lanes);
    std::vector<float> keys(kKeyBlock * dp), values(kKeyBlock * dp), row(dp), row2(dp);
    std::vector<float> lse2(max_lanes), delta(max_lanes);
    std::vector<const char*> rows(max_lanes);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const QueryTile tile(s, item, per_item);
      const KeySource src(s, ctx, elem, args.k_new, args.v_new, tile.b, tile.kv_head);
      for (int64_t r = 0; r < tile.lanes; ++r) rows[r] = q + tile.offset(s, r) * elem;
      load_transposed(ops, type, rows.data(), tile.lanes, tile.padded, s.dim, dp,
                      scale * kLog2e, row.data(), qt.data());
      for (int64_t r = 0; r < tile.lanes; ++r) rows[r] = dout + tile.offset(s, r) * elem;
      load_transposed(ops, type, rows.data(), tile.lanes, tile.padded, s.dim, dp, 1.0f,
                      row.data(), dot.data());
      std::fill(lse2.begin(), lse2.end(), 0.0f);
      std::fill(delta.begin(), delta.end(), 0.0f);
      for (int64_t r = 0; r < tile.lanes; ++r) {
        const int64_t at = tile.offset(s, r) * elem, li = tile.lse_index(s, r);
        ops.load_row(type, dout + at, s.dim, dp, 1.0f, row.data());
        ops.load_row(type, out + at, s.dim, dp, 1.0f, row2.data());
        float dot_do_o = 0.0f;
        for (int64_t d = 0; d < s.dim; ++d) dot_do_o += row[d] * row2[d];
        delta[r] = dot_do_o - args.dlse[li];
        delta_out[li] = delta[r];
        lse2[r] = args.lse[li] * kLog2e;
      }
      std::fill(dq.begin(), dq.begin() + tile.lanes * dp, 0.0f);
      for (int64_t t0 = 0; t0 < src.total; t0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, src.total - t0);
        load_key_block(ops, type, src, t0, n, s.dim, dp, keys.data(), values.data());
        ops.gemm(n, tile.padded, dp, keys.data(), dp, 1, qt.data(), tile.padded, st.data(),
                 tile.padded, false, nullptr);
        ops.exp2_minus_lane(st.data(), n, tile.padded, lse2.data());  // P^T
        ops.gemm(n, tile.padded, dp, values.data(), dp, 1, dot.data(), tile.padded, dpt.data(),
                 tile.padded, false, nullptr);  // dP^T = V dO^T
        for (int64_t j = 0; j < n; ++j) {
          float* p = st.data() + j * tile.padded;
          const float* g = dpt.data() + j * tile.padded;
          for (int64_t r = 0; r < tile.padded; ++r) p[r] *= g[r] - delta[r];  // dS^T
        }
        ops.gemm(tile.lanes, dp, n, st.data(), 1, tile.padded, keys.data(), dp, dq.data(), dp,
                 true, nullptr);
      }
      char* dq_out = static_cast<char*>(args.dq);
      for (int64_t r = 0; r < tile.lanes; ++r)
        ops.store_row(type, dq.data() + r * dp, s.dim, scale, dq_out + tile.offset(s, r) * elem);
    }
  }
}

// Backward pass 2: dK, dV of the new tokens over every query of the kv head's query heads.
void backward_new_tokens(const TileOps& ops, const RoutedAttentionShape& s, ElemType type,
                         const PagedContext& ctx, const RoutedAttentionBackwardArgs& args,
                         float scale, const float* delta) {
  const int64_t elem = element_size(type), dp = round_up(s.dim, 16);
  const int64_t group = s.heads / s.kv_heads, tiles = ceil_div(s.ln, kKeyBlock);
  const int64_t items = s.batch * s.kv_heads * tiles, max_keys = round_up(kKeyBlock, 16);
  const char* q = static_cast<const char*>(args.q);
  const char* dout = static_cast<const char*>(args.dout);
#pragma omp parallel if (items > 1)
  {
    std::vector<float> kt(dp * max_keys), vt(dp * max_keys), dk(kKeyBlock * dp),
        dv(kKeyBlock * dp);
    std::vector<float> qb(kQueryBlock * dp), dob(kQueryBlock * dp), sb(kQueryBlock * max_keys),
        dpb(kQueryBlock * max_keys), row(dp), lse2(kQueryBlock), dl(kQueryBlock);
    std::vector<const char*> rows(kKeyBlock);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / (s.kv_heads * tiles), h = (item / tiles) % s.kv_heads;
      const int64_t k0 = (item % tiles) * kKeyBlock, n = std::min(kKeyBlock, s.ln - k0);
      const int64_t lanes = round_up(n, 16);
      const KeySource src(s, ctx, elem, args.k_new, args.v_new, b, h);
      const int64_t t0 = src.ctx_len + k0;
      for (int64_t j = 0; j < n; ++j) rows[j] = src.key_address(t0 + j);
      load_transposed(ops, type, rows.data(), n, lanes, s.dim, dp, scale * kLog2e, row.data(),
                      kt.data());
      for (int64_t j = 0; j < n; ++j) rows[j] = src.value_address(t0 + j);
      load_transposed(ops, type, rows.data(), n, lanes, s.dim, dp, 1.0f, row.data(), vt.data());
      std::fill(dk.begin(), dk.end(), 0.0f);
      std::fill(dv.begin(), dv.end(), 0.0f);
      for (int64_t head = h * group; head < (h + 1) * group; ++head) {
        for (int64_t q0 = 0; q0 < s.lq; q0 += kQueryBlock) {
          const int64_t nq = std::min(kQueryBlock, s.lq - q0);
          for (int64_t i = 0; i < nq; ++i) {
            const int64_t at = ((b * s.lq + q0 + i) * s.heads + head) * s.dim * elem;
            const int64_t li = (b * s.heads + head) * s.lq + q0 + i;
            ops.load_row(type, q + at, s.dim, dp, 1.0f, qb.data() + i * dp);
            ops.load_row(type, dout + at, s.dim, dp, 1.0f, dob.data() + i * dp);
            lse2[i] = args.lse[li] * kLog2e;
            dl[i] = delta[li];
          }
          ops.gemm(nq, lanes, dp, qb.data(), dp, 1, kt.data(), lanes, sb.data(), lanes, false,
                   nullptr);
          ops.exp2_minus_row(sb.data(), nq, lanes, lse2.data());  // P
          ops.gemm(n, dp, nq, sb.data(), 1, lanes, dob.data(), dp, dv.data(), dp, true, nullptr);
          ops.gemm(nq, lanes, dp, dob.data(), dp, 1, vt.data(), lanes, dpb.data(), lanes, false,
                   nullptr);  // dP = dO V^T
          for (int64_t i = 0; i < nq; ++i) {
            float* p = sb.data() + i * lanes;
            const float* g = dpb.data() + i * lanes;
            for (int64_t j = 0; j < lanes; ++j) p[j] *= g[j] - dl[i];  // dS
          }
          ops.gemm(n, dp, nq, sb.data(), 1, lanes, qb.data(), dp, dk.data(), dp, true, nullptr);
        }
      }
      char* dk_out = static_cast<char*>(args.dk_new);
      char* dv_out = static_cast<char*>(args.dv_new);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t at = ((b * s.ln + k0 + j) * s.kv_heads + h) * s.dim * elem;
        ops.store_row(type, dk.data() + j * dp, s.dim, scale, dk_out + at);
        ops.store_row(type, dv.data() + j * dp, s.dim, 1.0f, dv_out + at);
      }
    }
  }
}

}  // namespace

void routed_attention_backward_cpu(const RoutedAttentionShape& s, ElemType type,
                                   const PagedContext& ctx, const RoutedAttentionBackwardArgs& args,
                                   float scale) {
  const TileOps& ops = tile_ops();
  std::vector<float> delta(s.batch * s.heads * s.lq);
  backward_queries(ops, s, type, ctx, args, scale, delta.data());
  if (s.ln > 0) backward_new_tokens(ops, s, type, ctx, args, scale, delta.data());
}

}  // namespace kvpo
