// Page copy/write kernels over a paged KV pool, shared declarations.
//
// For copies a pool is viewed as [L, P, page_bytes]: L layers (stride_layer bytes apart), P pages
// (stride_page bytes apart), each page a contiguous run of page_bytes bytes.
#pragma once
#include <cstdint>

#include "kvpo/common.h"

namespace kvpo {

struct PoolView {
  char* base;            // address of layer 0, page 0
  int64_t layers;        // L
  int64_t stride_layer;  // bytes between layers
  int64_t stride_page;   // bytes between pages
  int64_t page_bytes;    // contiguous bytes per page
};

// One layer's pool [P, 2, page_size, H, D] as token rows: row `offset` of K (kv = 0) or V (kv = 1)
// in page `page` starts at base + page * stride_page + kv * stride_kv + offset * stride_token and
// holds row_bytes contiguous bytes (H * D elements).
struct LayerPagesView {
  char* base;
  int64_t num_slots;     // num_pages * page_size: valid slots are 0 .. num_slots - 1
  int64_t page_size;     // tokens per page
  int64_t stride_page;   // bytes between pages
  int64_t stride_kv;     // bytes between the K and V halves of a page
  int64_t stride_token;  // bytes between token rows of a page
  int64_t row_bytes;     // contiguous bytes per token row
};

// N token rows of row_bytes bytes, stride bytes apart (k or v of write_pages).
struct TokenRows {
  const char* base;
  int64_t stride;
};

// Address of the K (kv = 0) or V (kv = 1) row of slot `slot` = page_id * page_size + offset.
KVPO_HD char* slot_address(const LayerPagesView& pool, int64_t slot, int64_t kv) {
  const int64_t page = slot / pool.page_size;
  const int64_t offset = slot - page * pool.page_size;
  return pool.base + offset_bytes(page, pool.stride_page) + offset_bytes(kv, pool.stride_kv) +
         offset_bytes(offset, pool.stride_token);
}

// Address of page `page` of layer `layer`.
KVPO_HD char* page_address(const PoolView& pool, int64_t layer, int64_t page) {
  return pool.base + offset_bytes(layer, pool.stride_layer) + offset_bytes(page, pool.stride_page);
}

// pool[l, dst[i]] = pool[l, src[i]] for every layer l and i < n. dst and src must be disjoint.
void copy_pages_cpu(const PoolView& pool, const int32_t* src, const int32_t* dst, int64_t n);

// pool[slots[i] K row] = k row i, pool[slots[i] V row] = v row i for i < n. Slots distinct.
void write_pages_cpu(const LayerPagesView& pool, TokenRows k, TokenRows v, const int64_t* slots,
                     int64_t n);

#ifdef KVPO_WITH_CUDA
void copy_pages_cuda(const PoolView& pool, const int32_t* src, const int32_t* dst, int64_t n,
                     void* stream);
void write_pages_cuda(const LayerPagesView& pool, TokenRows k, TokenRows v, const int64_t* slots,
                      int64_t n, void* stream);
#endif

}  // namespace kvpo
