// CUDA kernels for page copies. Includes only CUDA headers and kvpo headers, so that
// `nvcc -c` compiles it without a CUDA build of torch (tools/check_cuda_compile.sh).
#include <cuda_runtime.h>

#include "kvpo/pages.h"

namespace kvpo {
namespace {

// One block per (copy i, layer); threads stride over the page in `Word` units.
template <typename Word>
__global__ void copy_pages_kernel(PoolView pool, const int32_t* src, const int32_t* dst) {
  const int64_t i = blockIdx.x;
  const int64_t layer = blockIdx.y;
  const Word* from = reinterpret_cast<const Word*>(page_address(pool, layer, src[i]));
  Word* to = reinterpret_cast<Word*>(page_address(pool, layer, dst[i]));
  const int64_t words = pool.page_bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) to[w] = from[w];
}

bool aligned16(const PoolView& pool) {
  return reinterpret_cast<uintptr_t>(pool.base) % 16 == 0 && pool.page_bytes % 16 == 0 &&
         pool.stride_page % 16 == 0 && pool.stride_layer % 16 == 0;
}

}  // namespace

void copy_pages_cuda(const PoolView& pool, const int32_t* src, const int32_t* dst, int64_t n,
                     void* stream) {
  if (n == 0 || pool.layers == 0) return;
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(pool.layers));
  auto s = static_cast<cudaStream_t>(stream);
  if (aligned16(pool)) {
    copy_pages_kernel<uint4><<<grid, 256, 0, s>>>(pool, src, dst);
  } else {
    copy_pages_kernel<unsigned char><<<grid, 256, 0, s>>>(pool, src, dst);
  }
}

}  // namespace kvpo
