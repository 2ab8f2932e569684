// OpenMP CPU kernels of routed attention (see kvpo/routed_attention.h).
//
// Forward, per work item (row b, kv head, tile of queries; the G query heads of a kv head share
// the item so that each key block is loaded once for all of them):
//   Qt[D, M] = (scale * log2 e) * Q^T                      M = G * queries, one lane per query
//   for each block of keys (the row's cached tokens, looked up per token through its page list,
//   then its new tokens) as rows K_b, V_b (fp32 rows are read where they lie, in the pages;
//   16-bit rows are converted to fp32 one block at a time; nothing is gathered):
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

constexpr int64_t kKeyBlock = 96;     // keys per block (rows of S^T), a multiple of the GEMM's 6
constexpr int64_t kLaneTarget = 256;  // queries (all heads of a group) per work item, about
constexpr int64_t kQueryBlock = 64;   // queries per block in the backward's pass 2
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

// Asks the caches for the key and value rows of token t. Rows are scattered over pages,
// H_kv * D elements apart, each in another 4 KiB page where the hardware prefetchers stop.
void prefetch_token(const KeySource& src, int64_t t, int64_t row_bytes) {
  if (t >= src.total) return;
  const char* k = src.key_address(t);
  const char* v = src.value_address(t);
  for (int64_t at = 0; at < row_bytes; at += 64) {
    __builtin_prefetch(k + at, 0, 2);
    __builtin_prefetch(v + at, 0, 2);
  }
}

// How rows of the inputs reach the GEMMs: fp32 rows whose length is a multiple of 16 are read
// where they lie; other rows are converted (and zero-padded to dp) into a tile.
struct RowReader {
  const TileOps& ops;
  DType type;
  int64_t dim, dp;
  bool in_place;

  RowReader(const TileOps& o, DType t, int64_t d)
      : ops(o), type(t), dim(d), dp(round_up(d, 16)), in_place(t == DType::F32 && d == dp) {}

  const float* row(const char* src, float* tile_row) const {
    if (in_place) return reinterpret_cast<const float*>(src);
    ops.load_row(type, src, dim, dp, 1.0f, tile_row);
    return tile_row;
  }
};

// Row pointers to the keys and values of tokens t0 .. t0 + n - 1, prefetching the rows of the
// next block (tokens t0 + kKeyBlock ..) as it goes.
void key_block_rows(const RowReader& reader, const KeySource& src, int64_t t0, int64_t n,
                    float* key_tile, float* value_tile, const float** keys, const float** values) {
  const int64_t row_bytes = reader.dim * element_size(reader.type);
  for (int64_t j = 0; j < n; ++j) {
    prefetch_token(src, t0 + kKeyBlock + j, row_bytes);
    keys[j] = reader.row(src.key_address(t0 + j), key_tile + j * reader.dp);
    values[j] = reader.row(src.value_address(t0 + j), value_tile + j * reader.dp);
  }
}

// Transposed, scaled copy of rows: dst[d, r] = scale * src_r[d] for r < rows, 0 for padding lanes.
void load_transposed(const TileOps& ops, DType type, const char* const* rows, int64_t count,
                     int64_t lanes, int64_t dim, int64_t dp, float scale, float* row_buffer,
                     float* dst) {
  for (int64_t r = 0; r < count; ++r) {
    ops.load_row(type, rows[r], dim, dp, scale, row_buffer);
    for (int64_t d = 0; d < dp; ++d) dst[d * lanes + r] = row_buffer[d];
  }
  for (int64_t d = 0; d < dp; ++d)
    for (int64_t r = count; r < lanes; ++r) dst[d * lanes + r] = 0.0f;
}

// Row pointers of a row-major [rows, ld] tile: out[i] = base + i * ld.
void tile_rows(const float* base, int64_t rows, int64_t ld, const float** out) {
  for (int64_t i = 0; i < rows; ++i) out[i] = base + i * ld;
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

// Scratch of one thread for the query-tile passes (forward and backward pass 1).
struct QueryScratch {
  std::vector<float> qt, dot, acc, st, dpt, key_tile, value_tile, row, row2;
  std::vector<float> m, l, alpha, lse2, delta;
  std::vector<const float*> keys, values, qt_rows, dot_rows, st_cols;
  std::vector<const char*> rows;
  QueryScratch(int64_t dp, int64_t max_lanes, bool backward)
      : qt(dp * max_lanes), dot(backward ? dp * max_lanes : 0), acc(max_lanes * dp),
        st(kKeyBlock * max_lanes), dpt(backward ? kKeyBlock * max_lanes : 0),
        key_tile(kKeyBlock * dp), value_tile(kKeyBlock * dp), row(dp), row2(dp), m(max_lanes),
        l(max_lanes), alpha(max_lanes), lse2(max_lanes), delta(max_lanes), keys(kKeyBlock),
        values(kKeyBlock), qt_rows(dp), dot_rows(dp), st_cols(max_lanes), rows(max_lanes) {}

  // Qt [dp, padded] = scale * the tile's query rows of `src`, transposed; and row pointers.
  void load_queries(const TileOps& ops, DType type, const RoutedAttentionShape& s,
                    const QueryTile& tile, const char* src, float scale, float* dst,
                    const float** dst_rows) {
    const int64_t elem = element_size(type), dp = round_up(s.dim, 16);
    for (int64_t r = 0; r < tile.lanes; ++r) rows[r] = src + tile.offset(s, r) * elem;
    load_transposed(ops, type, rows.data(), tile.lanes, tile.padded, s.dim, dp, scale,
                    row.data(), dst);
    tile_rows(dst, dp, tile.padded, dst_rows);
  }
};

}  // namespace

void routed_attention_forward_cpu(const RoutedAttentionShape& s, DType type,
                                  const PagedContext& ctx, const RoutedAttentionForwardArgs& args,
                                  float scale) {
  const TileOps& ops = tile_ops();
  const RowReader reader(ops, type, s.dim);
  const int64_t elem = element_size(type), dp = reader.dp;
  const int64_t per_item = queries_per_item(s), items = query_items(s);
  const int64_t max_lanes = round_up((s.heads / s.kv_heads) * per_item, 16);
  char* out = static_cast<char*>(args.out);
#pragma omp parallel if (items > 1)
  {
    QueryScratch w(dp, max_lanes, false);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const QueryTile tile(s, item, per_item);
      const KeySource src(s, ctx, elem, args.k_new, args.v_new, tile.b, tile.kv_head);
      w.load_queries(ops, type, s, tile, static_cast<const char*>(args.q), scale * kLog2e,
                     w.qt.data(), w.qt_rows.data());
      for (int64_t r = 0; r < tile.lanes; ++r) w.st_cols[r] = w.st.data() + r;
      std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
      std::fill(w.l.begin(), w.l.end(), 0.0f);
      std::fill(w.acc.begin(), w.acc.begin() + tile.lanes * dp, 0.0f);
      for (int64_t t0 = 0; t0 < src.total; t0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, src.total - t0);
        key_block_rows(reader, src, t0, n, w.key_tile.data(), w.value_tile.data(), w.keys.data(),
                       w.values.data());
        // S^T = K Qt; online softmax over its rows; O = diag(alpha) O + P V
        ops.gemm(n, tile.padded, dp, w.keys.data(), 1, w.qt_rows.data(), w.st.data(),
                 tile.padded, false, nullptr);
        ops.softmax_step(w.st.data(), n, tile.padded, w.m.data(), w.l.data(), w.alpha.data());
        ops.gemm(tile.lanes, dp, n, w.st_cols.data(), tile.padded, w.values.data(), w.acc.data(),
                 dp, true, w.alpha.data());
      }
      for (int64_t r = 0; r < tile.lanes; ++r) {
        const bool empty = !(w.l[r] > 0.0f);
        ops.store_row(type, w.acc.data() + r * dp, s.dim, empty ? 0.0f : 1.0f / w.l[r],
                      out + tile.offset(s, r) * elem);
        args.lse[tile.lse_index(s, r)] = empty ? -std::numeric_limits<float>::infinity()
                                               : (w.m[r] + std::log2(w.l[r])) * kLn2;
      }
    }
  }
}

namespace {

// Backward pass 1: dQ of every query over all its keys; also writes delta = rowsum(dO O) - dlse.
void backward_queries(const TileOps& ops, const RoutedAttentionShape& s, DType type,
                      const PagedContext& ctx, const RoutedAttentionBackwardArgs& args,
                      float scale, float* delta_out) {
  const RowReader reader(ops, type, s.dim);
  const int64_t elem = element_size(type), dp = reader.dp;
  const int64_t per_item = queries_per_item(s), items = query_items(s);
  const int64_t max_lanes = round_up((s.heads / s.kv_heads) * per_item, 16);
  const char* dout = static_cast<const char*>(args.dout);
  const char* out = static_cast<const char*>(args.out);
#pragma omp parallel if (items > 1)
  {
    QueryScratch w(dp, max_lanes, true);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const QueryTile tile(s, item, per_item);
      const KeySource src(s, ctx, elem, args.k_new, args.v_new, tile.b, tile.kv_head);
      w.load_queries(ops, type, s, tile, static_cast<const char*>(args.q), scale * kLog2e,
                     w.qt.data(), w.qt_rows.data());
      w.load_queries(ops, type, s, tile, dout, 1.0f, w.dot.data(), w.dot_rows.data());
      for (int64_t r = 0; r < tile.lanes; ++r) w.st_cols[r] = w.st.data() + r;
      std::fill(w.lse2.begin(), w.lse2.end(), 0.0f);
      std::fill(w.delta.begin(), w.delta.end(), 0.0f);
      for (int64_t r = 0; r < tile.lanes; ++r) {
        const int64_t at = tile.offset(s, r) * elem, li = tile.lse_index(s, r);
        ops.load_row(type, dout + at, s.dim, dp, 1.0f, w.row.data());
        ops.load_row(type, out + at, s.dim, dp, 1.0f, w.row2.data());
        float dot_do_o = 0.0f;
        for (int64_t d = 0; d < s.dim; ++d) dot_do_o += w.row[d] * w.row2[d];
        w.delta[r] = dot_do_o - args.dlse[li];
        delta_out[li] = w.delta[r];
        w.lse2[r] = args.lse[li] * kLog2e;
      }
      std::fill(w.acc.begin(), w.acc.begin() + tile.lanes * dp, 0.0f);
      for (int64_t t0 = 0; t0 < src.total; t0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, src.total - t0);
        key_block_rows(reader, src, t0, n, w.key_tile.data(), w.value_tile.data(), w.keys.data(),
                       w.values.data());
        // P^T = exp2(K Qt - lse2); dP^T = V dOt; dS^T = P^T (dP^T - delta); dQ += dS K
        ops.gemm(n, tile.padded, dp, w.keys.data(), 1, w.qt_rows.data(), w.st.data(),
                 tile.padded, false, nullptr);
        ops.exp2_minus_lane(w.st.data(), n, tile.padded, w.lse2.data());
        ops.gemm(n, tile.padded, dp, w.values.data(), 1, w.dot_rows.data(), w.dpt.data(),
                 tile.padded, false, nullptr);
        for (int64_t j = 0; j < n; ++j) {
          float* p = w.st.data() + j * tile.padded;
          const float* g = w.dpt.data() + j * tile.padded;
          for (int64_t r = 0; r < tile.padded; ++r) p[r] *= g[r] - w.delta[r];
        }
        ops.gemm(tile.lanes, dp, n, w.st_cols.data(), tile.padded, w.keys.data(), w.acc.data(),
                 dp, true, nullptr);
      }
      char* dq_out = static_cast<char*>(args.dq);
      for (int64_t r = 0; r < tile.lanes; ++r)
        ops.store_row(type, w.acc.data() + r * dp, s.dim, scale, dq_out + tile.offset(s, r) * elem);
    }
  }
}

// Backward pass 2: dK, dV of the new tokens over every query of the kv head's query heads.
void backward_new_tokens(const TileOps& ops, const RoutedAttentionShape& s, DType type,
                         const PagedContext& ctx, const RoutedAttentionBackwardArgs& args,
                         float scale, const float* delta) {
  const RowReader reader(ops, type, s.dim);
  const int64_t elem = element_size(type), dp = reader.dp;
  const int64_t group = s.heads / s.kv_heads, tiles = ceil_div(s.ln, kKeyBlock);
  const int64_t items = s.batch * s.kv_heads * tiles, max_keys = round_up(kKeyBlock, 16);
  const char* q = static_cast<const char*>(args.q);
  const char* dout = static_cast<const char*>(args.dout);
#pragma omp parallel if (items > 1)
  {
    std::vector<float> kt(dp * max_keys), vt(dp * max_keys), dk(kKeyBlock * dp),
        dv(kKeyBlock * dp), q_tile(kQueryBlock * dp), do_tile(kQueryBlock * dp),
        sb(kQueryBlock * max_keys), dpb(kQueryBlock * max_keys), row(dp), lse2(kQueryBlock),
        dl(kQueryBlock);
    std::vector<const float*> kt_rows(dp), vt_rows(dp), q_rows(kQueryBlock),
        do_rows(kQueryBlock), sb_cols(max_keys);
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
      tile_rows(kt.data(), dp, lanes, kt_rows.data());
      tile_rows(vt.data(), dp, lanes, vt_rows.data());
      for (int64_t j = 0; j < n; ++j) sb_cols[j] = sb.data() + j;
      std::fill(dk.begin(), dk.end(), 0.0f);
      std::fill(dv.begin(), dv.end(), 0.0f);
      for (int64_t head = h * group; head < (h + 1) * group; ++head) {
        for (int64_t q0 = 0; q0 < s.lq; q0 += kQueryBlock) {
          const int64_t nq = std::min(kQueryBlock, s.lq - q0);
          for (int64_t i = 0; i < nq; ++i) {
            const int64_t at = ((b * s.lq + q0 + i) * s.heads + head) * s.dim * elem;
            const int64_t li = (b * s.heads + head) * s.lq + q0 + i;
            q_rows[i] = reader.row(q + at, q_tile.data() + i * dp);
            do_rows[i] = reader.row(dout + at, do_tile.data() + i * dp);
            lse2[i] = args.lse[li] * kLog2e;
            dl[i] = delta[li];
            if (q0 + nq + i < s.lq) {  // the next block's rows, while this one computes
              const int64_t next = at + nq * s.heads * s.dim * elem;
              for (int64_t byte = 0; byte < s.dim * elem; byte += 64) {
                __builtin_prefetch(q + next + byte, 0, 2);
                __builtin_prefetch(dout + next + byte, 0, 2);
              }
            }
          }
          // P = exp2(Q Kt - lse2); dV += P^T dO; dP = dO Vt; dS = P (dP - delta); dK += dS^T Q
          ops.gemm(nq, lanes, dp, q_rows.data(), 1, kt_rows.data(), sb.data(), lanes, false,
                   nullptr);
          ops.exp2_minus_row(sb.data(), nq, lanes, lse2.data());
          ops.gemm(n, dp, nq, sb_cols.data(), lanes, do_rows.data(), dv.data(), dp, true,
                   nullptr);
          ops.gemm(nq, lanes, dp, do_rows.data(), 1, vt_rows.data(), dpb.data(), lanes, false,
                   nullptr);
          for (int64_t i = 0; i < nq; ++i) {
            float* p = sb.data() + i * lanes;
            const float* g = dpb.data() + i * lanes;
            for (int64_t j = 0; j < lanes; ++j) p[j] *= g[j] - dl[i];
          }
          ops.gemm(n, dp, nq, sb_cols.data(), lanes, q_rows.data(), dk.data(), dp, true,
                   nullptr);
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

void routed_attention_backward_cpu(const RoutedAttentionShape& s, DType type,
                                   const PagedContext& ctx, const RoutedAttentionBackwardArgs& args,
                                   float scale) {
  const TileOps& ops = tile_ops();
  std::vector<float> delta(s.batch * s.heads * s.lq);
  backward_queries(ops, s, type, ctx, args, scale, delta.data());
  if (s.ln > 0) backward_new_tokens(ops, s, type, ctx, args, scale, delta.data());
}

}  // namespace kvpo
