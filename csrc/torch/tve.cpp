// Dispatcher registration of the TVE ops and their CPU implementations. The helpers in
// kvpo::tve_binding turn [G, K, A, B, C] tensors into the plain views of kvpo/tve.h; the CUDA
// bindings (csrc/torch/cuda/tve.cpp) use them too.
#include <ATen/ATen.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kvpo/tve.h"

namespace kvpo {
namespace tve_binding {

TveDType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return TveDType::F32;
    case at::kHalf: return TveDType::F16;
    case at::kBFloat16: return TveDType::BF16;
    case at::kDouble: return TveDType::F64;
    default: TORCH_CHECK(false, "tve: expected fp32, fp16, bf16 or fp64 inputs, got ", t.scalar_type());
  }
}

at::ScalarType accumulation_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// pred, target: [G, K, A, B, C] with equal sizes, dtype and device.
TveShape shape_of(const at::Tensor& pred, const at::Tensor& target, int64_t chunk) {
  TORCH_CHECK(pred.dim() == 5, "tve: expected [G, K, A, B, C] item views, got ", pred.dim(),
              " dims");
  TORCH_CHECK(pred.sizes() == target.sizes(), "tve: pred is ", pred.sizes(), ", target ",
              target.sizes());
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), "tve: pred is ", pred.scalar_type(),
              ", target ", target.scalar_type());
  TORCH_CHECK(pred.device() == target.device(), "tve: pred is on ", pred.device(), ", target on ",
              target.device());
  dtype_of(pred);
  const int64_t numel = pred.size(2) * pred.size(3) * pred.size(4);
  return TveShape{pred.size(0), pred.size(1), pred.size(3), pred.size(4),
                  numel,        chunk,        tve_chunks(numel, chunk)};
}

TveOperand operand_of(const at::Tensor& t) {
  return TveOperand{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// coef: [G, K] contiguous, in the accumulation dtype of pred.
void check_coef(const at::Tensor& coef, const at::Tensor& pred) {
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == pred.size(0) && coef.size(1) == pred.size(1),
              "tve: coef must be [G, K] = [", pred.size(0), ", ", pred.size(1), "], got ",
              coef.sizes());
  TORCH_CHECK(coef.is_contiguous(), "tve: coef must be contiguous");
  TORCH_CHECK(coef.scalar_type() == accumulation_type(pred), "tve: coef must be ",
              accumulation_type(pred), ", got ", coef.scalar_type());
  TORCH_CHECK(coef.device() == pred.device(), "tve: coef is on ", coef.device(), ", pred on ",
              pred.device());
}

}  // namespace tve_binding

namespace {

// A fresh gradient is written once, right after its allocation: with 4 KiB pages the first-touch
// page faults cost several times the kernel itself (a Wan-block gradient is ~19k pages). Ask for
// transparent huge pages on the 2 MiB-aligned interior of large buffers (a hint; harmless if the
// kernel declines).
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

at::Tensor tve_item_sq_sum_cpu_op(const at::Tensor& pred, const at::Tensor& target) {
  const TveShape s = tve_binding::shape_of(pred, target, kTveChunkCpu);
  const auto acc = pred.options().dtype(tve_binding::accumulation_type(pred));
  at::Tensor out = at::zeros({s.groups, s.items}, acc);
  if (s.groups * s.items * s.numel == 0) return out;
  at::Tensor partials = at::empty({s.groups * s.items * s.n_chunks}, acc);
  tve_item_sq_sum_cpu(tve_binding::dtype_of(pred), s, tve_binding::operand_of(pred),
                      tve_binding::operand_of(target), partials.data_ptr(), out.data_ptr());
  return out;
}

std::vector<at::Tensor> tve_item_sq_sum_backward_cpu_op(const at::Tensor& coef,
                                                        const at::Tensor& pred,
                                                        const at::Tensor& target,
                                                        bool with_target) {
  const TveShape s = tve_binding::shape_of(pred, target, kTveChunkCpu);
  tve_binding::check_coef(coef, pred);
  at::Tensor grad_pred = at::empty({s.groups, s.items, s.numel}, pred.options());
  at::Tensor grad_target = with_target ? at::empty_like(grad_pred) : at::Tensor();
  advise_huge_pages(grad_pred);
  if (with_target) advise_huge_pages(grad_target);
  if (grad_pred.numel() > 0) {
    tve_item_sq_sum_backward_cpu(tve_binding::dtype_of(pred), s, tve_binding::operand_of(pred),
                                 tve_binding::operand_of(target), coef.data_ptr(),
                                 grad_pred.data_ptr(),
                                 with_target ? grad_target.data_ptr() : nullptr);
  }
  if (with_target) return {grad_pred, grad_target};
  return {grad_pred};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvpo_C, m) {
  m.def("tve_item_sq_sum(Tensor pred, Tensor target) -> Tensor");
  m.def(
      "tve_item_sq_sum_backward(Tensor coef, Tensor pred, Tensor target, bool with_target) -> "
      "Tensor[]");
}

TORCH_LIBRARY_IMPL(kvpo_C, CPU, m) {
  m.impl("tve_item_sq_sum", &tve_item_sq_sum_cpu_op);
  m.impl("tve_item_sq_sum_backward", &tve_item_sq_sum_backward_cpu_op);
}

}  // namespace kvpo
