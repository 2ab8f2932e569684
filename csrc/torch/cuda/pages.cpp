// CUDA implementations of the page ops (built only with KVPO_WITH_CUDA); arguments are checked
// by the prologue shared with the CPU registration (pages_args.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../pages_args.h"

namespace kvpo {
namespace {

void copy_pages_cuda_op(at::Tensor pages, const at::Tensor& src, const at::Tensor& dst) {
  const CopyPagesArgs a = copy_pages_args(pages, src, dst);
  const c10::cuda::CUDAGuard guard(pages.device());
  copy_pages_cuda(a.pool, a.src, a.dst, a.n, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void write_pages_cuda_op(at::Tensor kv_pages, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& slots) {
  const WritePagesArgs a = write_pages_args(kv_pages, k, v, slots);
  const c10::cuda::CUDAGuard guard(kv_pages.device());
  write_pages_cuda(a.pool, a.k, a.v, a.slots, a.n, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(kvpo_C, CUDA, m) {
  m.impl("copy_pages", &copy_pages_cuda_op);
  m.impl("write_pages", &write_pages_cuda_op);
}

}  // namespace kvpo
