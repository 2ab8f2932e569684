// Shared host/device helpers of the kvpo kernels. Only standard headers here, so that the same
// index math compiles in the OpenMP CPU kernels (g++) and the CUDA kernels (nvcc -c).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define KVPO_HD __host__ __device__ __forceinline__
#else
#define KVPO_HD inline
#endif

namespace kvpo {

// Byte offset of element `index` along a dimension with `stride_bytes`; int64 so that pools
// larger than 2 GiB (or page ids * page bytes past 2^31) address correctly.
KVPO_HD int64_t offset_bytes(int64_t index, int64_t stride_bytes) { return index * stride_bytes; }

}  // namespace kvpo
