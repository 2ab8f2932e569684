// Conversions from torch tensors to the plain views the kernels take (torch-side only).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kvpo/pages.h"

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

// slots: [n] int64, contiguous, on the pool's device.
inline void check_slots(const at::Tensor& slots, int64_t n, const at::Tensor& kv_pages) {
  TORCH_CHECK(slots.scalar_type() == at::kLong, "slots must be int64, got ", slots.scalar_type());
  TORCH_CHECK(slots.dim() == 1 && slots.is_contiguous() && slots.numel() == n,
              "slots must be a contiguous 1-D tensor of ", n, " ids (one per k/v row), got ",
              slots.sizes());
  TORCH_CHECK(slots.device() == kv_pages.device(), "slots is on ", slots.device(),
              ", the pool on ", kv_pages.device());
}

inline void check_index(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", the pool on ",
              like.device());
}

}  // namespace kvpo
