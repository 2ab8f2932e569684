// OpenMP CPU kernels for page copies and token writes. No torch headers: pointers, sizes and
// strides only.
#include <cstring>

#include "kvpo/pages.h"

namespace kvpo {

void copy_pages_cpu(const PoolView& pool, const int32_t* src, const int32_t* dst, int64_t n) {
  const int64_t work = pool.layers * n;
#pragma omp parallel for schedule(static) if (work * pool.page_bytes > (1 << 16))
  for (int64_t w = 0; w < work; ++w) {
    const int64_t layer = w / n;
    const int64_t i = w % n;
    std::memcpy(page_address(pool, layer, dst[i]), page_address(pool, layer, src[i]),
                static_cast<size_t>(pool.page_bytes));
  }
}

void write_pages_cpu(const LayerPagesView& pool, TokenRows k, TokenRows v, const int64_t* slots,
                     int64_t n) {
#pragma omp parallel for schedule(static) if (n * pool.row_bytes > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const size_t bytes = static_cast<size_t>(pool.row_bytes);
    std::memcpy(slot_address(pool, slots[i], 0), k.base + offset_bytes(i, k.stride), bytes);
    std::memcpy(slot_address(pool, slots[i], 1), v.base + offset_bytes(i, v.stride), bytes);
  }
}

}  // namespace kvpo
