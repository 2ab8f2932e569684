// Dispatcher registration of the page ops (copy_pages, write_pages) and their CPU
// implementations.
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

void write_pages_cpu_op(at::Tensor kv_pages, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& slots) {
  const LayerPagesView pool = layer_pages_view(kv_pages);
  const TokenRows k_rows = token_rows(k, "k", kv_pages);
  const TokenRows v_rows = token_rows(v, "v", kv_pages);
  TORCH_CHECK(k.size(0) == v.size(0), "k has ", k.size(0), " rows, v has ", v.size(0));
  check_slots(slots, k.size(0), kv_pages);
  const int64_t* ids = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < pool.num_slots, "slots[", i, "] names ", ids[i],
                ", the pool has ", pool.num_slots, " slots");
  }
  write_pages_cpu(pool, k_rows, v_rows, ids, slots.numel());
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
