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

inline void check_index(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", the pool on ",
              like.device());
}

}  // namespace kvpo
