// Dispatcher registration of the TVE ops and their CPU implementations; arguments are checked
// and outputs allocated by the prologue shared with CUDA (tve_args.h).
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "tve_args.h"

namespace kvpo {
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
  const TveForwardArgs a = tve_forward_args(pred, target, kTveChunkCpu);
  if (a.empty()) return a.out;
  tve_item_sq_sum_cpu(a.dtype, a.shape, a.pred, a.target, a.partials.data_ptr(), a.out.data_ptr());
  return a.out;
}

std::vector<at::Tensor> tve_item_sq_sum_backward_cpu_op(const at::Tensor& coef,
                                                        const at::Tensor& pred,
                                                        const at::Tensor& target,
                                                        bool with_target) {
  const TveBackwardArgs a = tve_backward_args(coef, pred, target, with_target, kTveChunkCpu);
  advise_huge_pages(a.grad_pred);
  if (with_target) advise_huge_pages(a.grad_target);
  if (a.grad_pred.numel() > 0) {
    tve_item_sq_sum_backward_cpu(a.dtype, a.shape, a.pred, a.target, a.coef,
                                 a.grad_pred.data_ptr(), a.grad_target_ptr());
  }
  return a.grads();
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
