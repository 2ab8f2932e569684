// Routed attention over a paged KV pool: shared declarations (pointers, sizes and strides only).
//
// Row b attends, without a mask, to its first ctx_lens[b] cached tokens (token t lives in page
// page_table[b, t / page_size], slot t % page_size) followed by its Ln new tokens:
//   out[b, i, h] = softmax_j(scale * q[b, i, h] . key_j[h / G]) @ value_j,  G = H / H_kv
//   lse[b, h, i] = logsumexp_j(scale * q[b, i, h] . key_j[h / G])            (natural log)
// An empty row gives out = 0, lse = -inf.
#pragma once
#include <cstdint>

#include "kvpo/common.h"
#include "kvpo/dtype.h"

namespace kvpo {

struct RoutedAttentionShape {
  int64_t batch;     // B
  int64_t lq;        // queries per row
  int64_t ln;        // new tokens per row
  int64_t heads;     // H (query heads)
  int64_t kv_heads;  // H_kv, H % H_kv == 0
  int64_t dim;       // D
};

// One layer's pool [P, 2, page_size, H_kv, D] (K at index 0, V at 1; each page contiguous) and
// the rows' page lists.
struct PagedContext {
  const void* pages;          // element [0, 0, 0, 0, 0]
  int64_t stride_page;        // elements between consecutive pages
  int64_t page_size;          // tokens per page
  const int32_t* page_table;  // [B, table_stride] page ids in attention order
  int64_t table_stride;       // elements between rows of page_table
  const int32_t* ctx_lens;    // [B] cached tokens attended by each row
};

// Element offset, from `pages`, of the K vector of cached token t of a row for kv head h; the V
// vector is value_offset() elements further. int64 throughout: page ids times page sizes pass
// 2^31 in large pools.
KVPO_HD int64_t cached_key_offset(const PagedContext& ctx, const int32_t* table_row, int64_t t,
                                  int64_t kv_heads, int64_t dim, int64_t h) {
  const int64_t page = table_row[t / ctx.page_size];
  const int64_t slot = t % ctx.page_size;
  return page * ctx.stride_page + (slot * kv_heads + h) * dim;
}

KVPO_HD int64_t value_offset(const PagedContext& ctx, int64_t kv_heads, int64_t dim) {
  return ctx.page_size * kv_heads * dim;
}

// Dense tensors, all contiguous: q/out/dout/dq [B, Lq, H, D], k_new/v_new/dk/dv [B, Ln, H_kv, D]
// in the element type; lse/dlse [B, H, Lq] fp32.
struct RoutedAttentionForwardArgs {
  const void* q;
  const void* k_new;
  const void* v_new;
  void* out;
  float* lse;
};

struct RoutedAttentionBackwardArgs {
  const void* dout;
  const float* dlse;  // gradient of lse (zeros when lse was not used)
  const void* q;
  const void* k_new;
  const void* v_new;
  const void* out;
  const float* lse;
  void* dq;
  void* dk_new;
  void* dv_new;
};

// OpenMP CPU kernels: blocked online softmax, pages read in place through the page table,
// fp32 accumulation; `type` is F32, F16 or BF16.
void routed_attention_forward_cpu(const RoutedAttentionShape& shape, DType type,
                                  const PagedContext& ctx, const RoutedAttentionForwardArgs& args,
                                  float scale);

void routed_attention_backward_cpu(const RoutedAttentionShape& shape, DType type,
                                   const PagedContext& ctx, const RoutedAttentionBackwardArgs& args,
                                   float scale);

}  // namespace kvpo
