// Checks and conversions from torch tensors to the plain types the kernels take (torch side only,
// shared by the CPU and CUDA registrations).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kvpo/dtype.h"

namespace kvpo {

// The kernels' element type of a floating-point tensor; `op` names the caller in the error.
inline DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kDouble: return DType::F64;
    default:
      TORCH_CHECK(false, op, ": expected float32, float16, bfloat16 or float64, got ",
                  t.scalar_type());
  }
}

// t: a contiguous 1-D int32 tensor on like's device.
inline void check_index(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", the pool on ",
              like.device());
}

}  // namespace kvpo
