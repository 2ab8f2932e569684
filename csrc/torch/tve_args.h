// Argument checks, kernel views and output allocation of the TVE ops: the one prologue of their
// CPU (csrc/torch/tve.cpp) and CUDA (csrc/torch/cuda/tve.cpp) registrations. The inputs are the
// [G, K, A, B, C] item views built by kvpo_kernels/ops/tve.py.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

#include "kvpo/tve.h"
#include "tensor_views.h"

namespace kvpo {

inline at::ScalarType tve_accumulation_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline TveOperand tve_operand(const at::Tensor& t) {
  return TveOperand{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// pred, target: [G, K, A, B, C] with equal sizes, dtype and device.
inline TveShape tve_shape(const at::Tensor& pred, const at::Tensor& target, int64_t chunk) {
  TORCH_CHECK(pred.dim() == 5, "tve: expected [G, K, A, B, C] item views, got ", pred.dim(),
              " dims");
  TORCH_CHECK(pred.sizes() == target.sizes(), "tve: pred is ", pred.sizes(), ", target ",
              target.sizes());
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), "tve: pred is ", pred.scalar_type(),
              ", target ", target.scalar_type());
  TORCH_CHECK(pred.device() == target.device(), "tve: pred is on ", pred.device(), ", target on ",
              target.device());
  const int64_t numel = pred.size(2) * pred.size(3) * pred.size(4);
  return TveShape{pred.size(0), pred.size(1), pred.size(3), pred.size(4),
                  numel,        chunk,        tve_chunks(numel, chunk)};
}

// tve_item_sq_sum(pred, target) -> out [G, K] in the accumulation dtype.
struct TveForwardArgs {
  DType dtype;
  TveShape shape;
  TveOperand pred, target;
  at::Tensor out;       // zeros when there is no work, else written whole by the kernel
  at::Tensor partials;  // [G * K * n_chunks] workspace
  bool empty() const { return shape.groups * shape.items * shape.numel == 0; }
};

inline TveForwardArgs tve_forward_args(const at::Tensor& pred, const at::Tensor& target,
                                       int64_t chunk) {
  const TveShape s = tve_shape(pred, target, chunk);
  TveForwardArgs a{dtype_of(pred, "tve"), s, tve_operand(pred), tve_operand(target), {}, {}};
  const auto acc = pred.options().dtype(tve_accumulation_type(pred));
  a.out = a.empty() ? at::zeros({s.groups, s.items}, acc) : at::empty({s.groups, s.items}, acc);
  if (!a.empty()) a.partials = at::empty({s.groups * s.items * s.n_chunks}, acc);
  return a;
}

// tve_item_sq_sum_backward(coef, pred, target, with_target) -> [grad_pred (, grad_target)],
// contiguous [G, K, N] in pred's dtype.
struct TveBackwardArgs {
  DType dtype;
  TveShape shape;
  TveOperand pred, target;
  const void* coef;
  at::Tensor grad_pred, grad_target;  // grad_target undefined unless with_target
  void* grad_target_ptr() const { return grad_target.defined() ? grad_target.data_ptr() : nullptr; }
  std::vector<at::Tensor> grads() const {
    if (grad_target.defined()) return {grad_pred, grad_target};
    return {grad_pred};
  }
};

// coef: [G, K] contiguous, in the accumulation dtype of pred, on pred's device.
inline TveBackwardArgs tve_backward_args(const at::Tensor& coef, const at::Tensor& pred,
                                         const at::Tensor& target, bool with_target,
                                         int64_t chunk) {
  const TveShape s = tve_shape(pred, target, chunk);
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == pred.size(0) && coef.size(1) == pred.size(1),
              "tve: coef must be [G, K] = [", pred.size(0), ", ", pred.size(1), "], got ",
              coef.sizes());
  TORCH_CHECK(coef.is_contiguous(), "tve: coef must be contiguous");
  TORCH_CHECK(coef.scalar_type() == tve_accumulation_type(pred), "tve: coef must be ",
              tve_accumulation_type(pred), ", got ", coef.scalar_type());
  TORCH_CHECK(coef.device() == pred.device(), "tve: coef is on ", coef.device(), ", pred on ",
              pred.device());
  at::Tensor grad_pred = at::empty({s.groups, s.items, s.numel}, pred.options());
  at::Tensor grad_target = with_target ? at::empty_like(grad_pred) : at::Tensor();
  return TveBackwardArgs{dtype_of(pred, "tve"), s,         tve_operand(pred), tve_operand(target),
                         coef.data_ptr(),       grad_pred, grad_target};
}

}  // namespace kvpo
