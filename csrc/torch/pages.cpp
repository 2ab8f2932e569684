// Dispatcher registration of the page ops and their CPU implementations.
#include <torch/library.h>

#include "tensor_views.h"

namespace kvpo {
namespace {

void copy_pages_cpu_op(at::Tensor pages, const at::Tensor& src, const at::Tensor& dst) {
  check_index(src, "src", pages);
  check_index(dst, "dst", pages);
  TORCH_CHECK(src.numel() == dst.numel(), "src has ", src.numel(), " ids, dst ", dst.numel());
  copy_pages_cpu(pool_view(pages), src.data_ptr<int32_t>(), dst.data_ptr<int32_t>(), src.numel());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvpo_C, m) {
  m.def("copy_pages(Tensor(a!) pages, Tensor src, Tensor dst) -> ()");
}

TORCH_LIBRARY_IMPL(kvpo_C, CPU, m) { m.impl("copy_pages", &copy_pages_cpu_op); }

}  // namespace kvpo
