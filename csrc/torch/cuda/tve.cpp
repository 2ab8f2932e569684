// CUDA implementations of the TVE ops (built only with KVPO_WITH_CUDA). The tensor-to-view
// helpers are defined with the CPU bindings in csrc/torch/tve.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kvpo/tve.h"

namespace kvpo {
namespace tve_binding {
TveDType dtype_of(const at::Tensor& t);
at::ScalarType accumulation_type(const at::Tensor& t);
TveShape shape_of(const at::Tensor& pred, const at::Tensor& target, int64_t chunk);
TveOperand operand_of(const at::Tensor& t);
void check_coef(const at::Tensor& coef, const at::Tensor& pred);
}  // namespace tve_binding

namespace {

at::Tensor tve_item_sq_sum_cuda_op(const at::Tensor& pred, const at::Tensor& target) {
  const TveShape s = tve_binding::shape_of(pred, target, kTveChunkCuda);
  const c10::cuda::CUDAGuard guard(pred.device());
  const auto acc = pred.options().dtype(tve_binding::accumulation_type(pred));
  if (s.groups * s.items * s.numel == 0) return at::zeros({s.groups, s.items}, acc);
  at::Tensor out = at::empty({s.groups, s.items}, acc);
  at::Tensor partials = at::empty({s.groups * s.items * s.n_chunks}, acc);
  tve_item_sq_sum_cuda(tve_binding::dtype_of(pred), s, tve_binding::operand_of(pred),
                       tve_binding::operand_of(target), partials.data_ptr(), out.data_ptr(),
                       at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> tve_item_sq_sum_backward_cuda_op(const at::Tensor& coef,
                                                         const at::Tensor& pred,
                                                         const at::Tensor& target,
                                                         bool with_target) {
  const TveShape s = tve_binding::shape_of(pred, target, kTveChunkCuda);
  tve_binding::check_coef(coef, pred);
  const c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor grad_pred = at::empty({s.groups, s.items, s.numel}, pred.options());
  at::Tensor grad_target = with_target ? at::empty_like(grad_pred) : at::Tensor();
  tve_item_sq_sum_backward_cuda(tve_binding::dtype_of(pred), s, tve_binding::operand_of(pred),
                                tve_binding::operand_of(target), coef.data_ptr(),
                                grad_pred.data_ptr(),
                                with_target ? grad_target.data_ptr() : nullptr,
                                at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (with_target) return {grad_pred, grad_target};
  return {grad_pred};
}

}  // namespace

TORCH_LIBRARY_IMPL(kvpo_C, CUDA, m) {
  m.impl("tve_item_sq_sum", &tve_item_sq_sum_cuda_op);
  m.impl("tve_item_sq_sum_backward", &tve_item_sq_sum_backward_cuda_op);
}

}  // namespace kvpo
