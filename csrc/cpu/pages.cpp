// OpenMP CPU kernels for page copies. No torch headers: pointers, sizes and strides only.
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

}  // namespace kvpo
