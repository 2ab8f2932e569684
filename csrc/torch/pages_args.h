// Argument checks and kernel views of the page ops (copy_pages, write_pages): the one prologue of
// their CPU (csrc/torch/pages.cpp) and CUDA (csrc/torch/cuda/pages.cpp) registrations.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kvpo/pages.h"
#include "tensor_views.h"

namespace kvpo {

// pages: [L, P, *page_shape] with each page contiguous -> PoolView over bytes.
inline PoolView pool_view(const at::Tensor& pages) {
  TORCH_CHECK(pages.dim() >= 2, "pages must be [L, P, *page_shape], got ", pages.dim(), " dims");
  int64_t expected = 1;
  for (int64_t d = pages.dim() - 1; d >= 2; --d) {
    TORCH_CHECK(pages.size(d) == 1 || pages.stride(d) == expected,
                "each page of the pool must be contiguous; dim ", d, " has stride ",
                pages.stride(d), ", expected ", expected);
    expected *= pages.size(d);
  }
  const int64_t item = static_cast<int64_t>(pages.element_size());
  return PoolView{static_cast<char*>(pages.data_ptr()), pages.size(0), pages.stride(0) * item,
                  pages.stride(1) * item, expected * item};
}

// kv_pages: [P, 2, page_size, H, D] with each token row [H, D] contiguous -> LayerPagesView.
inline LayerPagesView layer_pages_view(const at::Tensor& kv_pages) {
  TORCH_CHECK(kv_pages.dim() == 5 && kv_pages.size(1) == 2,
              "kv_pages must be [P, 2, page_size, H, D], got ", kv_pages.sizes());
  TORCH_CHECK((kv_pages.size(4) == 1 || kv_pages.stride(4) == 1) &&
                  (kv_pages.size(3) == 1 || kv_pages.stride(3) == kv_pages.size(4)),
              "each token row [H, D] of kv_pages must be contiguous, got strides ",
              kv_pages.strides());
  const int64_t item = static_cast<int64_t>(kv_pages.element_size());
  return LayerPagesView{static_cast<char*>(kv_pages.data_ptr()),
                        kv_pages.size(0) * kv_pages.size(2),
                        kv_pages.size(2),
                        kv_pages.stride(0) * item,
                        kv_pages.stride(1) * item,
                        kv_pages.stride(2) * item,
                        kv_pages.size(3) * kv_pages.size(4) * item};
}

// rows: [N, H, D] like the pool's token rows, each row contiguous -> TokenRows.
inline TokenRows token_rows(const at::Tensor& rows, const char* name, const at::Tensor& kv_pages) {
  TORCH_CHECK(rows.dim() == 3 && rows.size(1) == kv_pages.size(3) &&
                  rows.size(2) == kv_pages.size(4),
              name, " must be [N, H=", kv_pages.size(3), ", D=", kv_pages.size(4), "], got ",
              rows.sizes());
  TORCH_CHECK(rows.scalar_type() == kv_pages.scalar_type(), name, " is ", rows.scalar_type(),
              ", the pool is ", kv_pages.scalar_type());
  TORCH_CHECK(rows.device() == kv_pages.device(), name, " is on ", rows.device(), ", the pool on ",
              kv_pages.device());
  TORCH_CHECK((rows.size(2) == 1 || rows.stride(2) == 1) &&
                  (rows.size(1) == 1 || rows.stride(1) == rows.size(2)),
              "each row [H, D] of ", name, " must be contiguous, got strides ", rows.strides());
  return TokenRows{static_cast<const char*>(rows.data_ptr()),
                   rows.stride(0) * static_cast<int64_t>(rows.element_size())};
}

// copy_pages(pages, src, dst): pages[l, dst[i]] = pages[l, src[i]].
struct CopyPagesArgs {
  PoolView pool;
  const int32_t* src;
  const int32_t* dst;
  int64_t n;
};

inline CopyPagesArgs copy_pages_args(const at::Tensor& pages, const at::Tensor& src,
                                     const at::Tensor& dst) {
  check_index(src, "src", pages);
  check_index(dst, "dst", pages);
  TORCH_CHECK(src.numel() == dst.numel(), "src has ", src.numel(), " ids, dst ", dst.numel());
  return CopyPagesArgs{pool_view(pages), src.data_ptr<int32_t>(), dst.data_ptr<int32_t>(),
                       src.numel()};
}

// write_pages(kv_pages, k, v, slots): the K and V rows of token i into slot slots[i].
struct WritePagesArgs {
  LayerPagesView pool;
  TokenRows k;
  TokenRows v;
  const int64_t* slots;
  int64_t n;
};

inline WritePagesArgs write_pages_args(const at::Tensor& kv_pages, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& slots) {
  const LayerPagesView pool = layer_pages_view(kv_pages);
  const TokenRows k_rows = token_rows(k, "k", kv_pages);
  const TokenRows v_rows = token_rows(v, "v", kv_pages);
  TORCH_CHECK(k.size(0) == v.size(0), "k has ", k.size(0), " rows, v has ", v.size(0));
  TORCH_CHECK(slots.scalar_type() == at::kLong, "slots must be int64, got ", slots.scalar_type());
  TORCH_CHECK(slots.dim() == 1 && slots.is_contiguous() && slots.numel() == k.size(0),
              "slots must be a contiguous 1-D tensor of ", k.size(0),
              " ids (one per k/v row), got ", slots.sizes());
  TORCH_CHECK(slots.device() == kv_pages.device(), "slots is on ", slots.device(),
              ", the pool on ", kv_pages.device());
  return WritePagesArgs{pool, k_rows, v_rows, slots.data_ptr<int64_t>(), slots.numel()};
}

}  // namespace kvpo
