// Dispatcher registration of the page ops (copy_pages, write_pages) and their CPU
// implementations; arguments are checked by the prologue shared with CUDA (pages_args.h).
#include <torch/library.h>

#include "pages_args.h"

namespace kvpo {
namespace {

void copy_pages_cpu_op(at::Tensor pages, const at::Tensor& src, const at::Tensor& dst) {
  const CopyPagesArgs a = copy_pages_args(pages, src, dst);
  copy_pages_cpu(a.pool, a.src, a.dst, a.n);
}

void write_pages_cpu_op(at::Tensor kv_pages, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& slots) {
  const WritePagesArgs a = write_pages_args(kv_pages, k, v, slots);
  for (int64_t i = 0; i < a.n; ++i) {  // host memory: checked here, the kernel trusts them
    TORCH_CHECK(a.slots[i] >= 0 && a.slots[i] < a.pool.num_slots, "slots[", i, "] names ",
                a.slots[i], ", the pool has ", a.pool.num_slots, " slots");
  }
  write_pages_cpu(a.pool, a.k, a.v, a.slots, a.n);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvpo_C, m) {
  m.def("copy_pages(Tensor(a!) pages, Tensor src, Tensor dst) -> ()");
  m.def("write_pages(Tensor(a!) kv_pages, Tensor k, Tensor v, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(kvpo_C, CPU, m) {
  m.impl("copy_pages", &copy_pages_cpu_op);
  m.impl("write_pages", &write_pages_cpu_op);
}

}  // namespace kvpo
