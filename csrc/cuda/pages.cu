// CUDA kernels for page copies and token writes. Includes only CUDA headers and kvpo headers, so
// that `nvcc -c` compiles it without a CUDA build of torch (tools/check_cuda_compile.sh).
#include <cuda_runtime.h>

#include <initializer_list>

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

// One block per (token i, K or V); threads stride over the token row in `Word` units. A slot
// outside the pool is skipped, never written (the Python layer reports it).
template <typename Word>
__global__ void write_pages_kernel(LayerPagesView pool, TokenRows k, TokenRows v,
                                   const int64_t* slots) {
  const int64_t i = blockIdx.x;
  const int64_t kv = blockIdx.y;
  const int64_t slot = slots[i];
  if (slot < 0 || slot >= pool.num_slots) return;
  const TokenRows rows = kv == 0 ? k : v;
  const Word* from = reinterpret_cast<const Word*>(rows.base + offset_bytes(i, rows.stride));
  Word* to = reinterpret_cast<Word*>(slot_address(pool, slot, kv));
  const int64_t words = pool.row_bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) to[w] = from[w];
}

// Largest of 16, 8, 4, 2, 1 dividing every value (addresses, strides, sizes in bytes).
int64_t common_alignment(std::initializer_list<int64_t> values) {
  int64_t align = 16;
  for (const int64_t value : values) {
    while (value % align != 0) align /= 2;
  }
  return align;
}

template <typename Word>
void launch_write_pages(const LayerPagesView& pool, TokenRows k, TokenRows v,
                        const int64_t* slots, int64_t n, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n), 2);
  write_pages_kernel<Word><<<grid, 128, 0, stream>>>(pool, k, v, slots);
}

}  // namespace

void write_pages_cuda(const LayerPagesView& pool, TokenRows k, TokenRows v, const int64_t* slots,
                      int64_t n, void* stream) {
  if (n == 0 || pool.row_bytes == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t align = common_alignment(
      {static_cast<int64_t>(reinterpret_cast<uintptr_t>(pool.base)),
       static_cast<int64_t>(reinterpret_cast<uintptr_t>(k.base)),
       static_cast<int64_t>(reinterpret_cast<uintptr_t>(v.base)), pool.stride_page,
       pool.stride_kv, pool.stride_token, pool.row_bytes, k.stride, v.stride});
  switch (align) {
    case 16: launch_write_pages<uint4>(pool, k, v, slots, n, s); break;
    case 8: launch_write_pages<uint2>(pool, k, v, slots, n, s); break;
    case 4: launch_write_pages<uint32_t>(pool, k, v, slots, n, s); break;
    case 2: launch_write_pages<uint16_t>(pool, k, v, slots, n, s); break;
    default: launch_write_pages<unsigned char>(pool, k, v, slots, n, s); break;
  }
}

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
