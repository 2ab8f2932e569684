// Page copy/write kernels over a paged KV pool, shared declarations.
//
// A pool is viewed as [L, P, page_bytes]: L layers (stride_layer bytes apart), P pages
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

// Address of page `page` of layer `layer`.
KVPO_HD char* page_address(const PoolView& pool, int64_t layer, int64_t page) {
  return pool.base + offset_bytes(layer, pool.stride_layer) + offset_bytes(page, pool.stride_page);
}

// pool[l, dst[i]] = pool[l, src[i]] for every layer l and i < n. dst and src must be disjoint.
void copy_pages_cpu(const PoolView& pool, const int32_t* src, const int32_t* dst, int64_t n);

#ifdef KVPO_WITH_CUDA
void copy_pages_cuda(const PoolView& pool, const int32_t* src, const int32_t* dst, int64_t n,
                     void* stream);
#endif

}  // namespace kvpo
