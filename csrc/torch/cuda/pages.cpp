// CUDA implementations of the page ops (built only with KVPO_WITH_CUDA).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../tensor_views.h"

namespace kvpo {
namespace {

void copy_pages_cuda_op(at::Tensor pages, const at::Tensor& src, const at::Tensor& dst) {
  check_index(src, "src", pages);
  check_index(dst, "dst", pages);
  TORCH_CHECK(src.numel() == dst.numel(), "src has ", src.numel(), " ids, dst ", dst.numel());
  const c10::cuda::CUDAGuard guard(pages.device());
  copy_pages_cuda(pool_view(pages), src.data_ptr<int32_t>(), dst.data_ptr<int32_t>(), src.numel(),
                  at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void write_pages_cuda_op(at::Tensor kv_pages, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& slots) {
  const LayerPagesView pool = layer_pages_view(kv_pages);
  const TokenRows k_rows = token_rows(k, "k", kv_pages);
  const TokenRows v_rows = token_rows(v, "v", kv_pages);
  TORCH_CHECK(k.size(0) == v.size(0), "k has ", k.size(0), " rows, v has ", v.size(0));
  check_slots(slots, k.size(0), kv_pages);
  const c10::cuda::CUDAGuard guard(kv_pages.device());
  write_pages_cuda(pool, k_rows, v_rows, slots.data_ptr<int64_t>(), slots.numel(),
                   at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(kvpo_C, CUDA, m) {
  m.impl("copy_pages", &copy_pages_cuda_op);
  m.impl("write_pages", &write_pages_cuda_op);
}

}  // namespace kvpo
