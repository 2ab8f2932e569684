// CUDA implementations of the TVE ops (built only with KVPO_WITH_CUDA); arguments are checked and
// outputs allocated by the prologue shared with the CPU registration (tve_args.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../tve_args.h"

namespace kvpo {
namespace {

at::Tensor tve_item_sq_sum_cuda_op(const at::Tensor& pred, const at::Tensor& target) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const TveForwardArgs a = tve_forward_args(pred, target, kTveChunkCuda);
  if (a.empty()) return a.out;
  tve_item_sq_sum_cuda(a.dtype, a.shape, a.pred, a.target, a.partials.data_ptr(), a.out.data_ptr(),
                       at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a.out;
}

std::vector<at::Tensor> tve_item_sq_sum_backward_cuda_op(const at::Tensor& coef,
                                                         const at::Tensor& pred,
                                                         const at::Tensor& target,
                                                         bool with_target) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const TveBackwardArgs a = tve_backward_args(coef, pred, target, with_target, kTveChunkCuda);
  tve_item_sq_sum_backward_cuda(a.dtype, a.shape, a.pred, a.target, a.coef,
                                a.grad_pred.data_ptr(), a.grad_target_ptr(),
                                at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a.grads();
}

}  // namespace

TORCH_LIBRARY_IMPL(kvpo_C, CUDA, m) {
  m.impl("tve_item_sq_sum", &tve_item_sq_sum_cuda_op);
  m.impl("tve_item_sq_sum_backward", &tve_item_sq_sum_backward_cuda_op);
}

}  // namespace kvpo
