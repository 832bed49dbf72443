// Launchers for the CUDA kernels in this folder. They take raw device pointers and a
// stream, not tensors, so the .cu files build with nvcc alone (no torch headers) and
// CI can compile every one of them for sm_90a on a machine without a CUDA torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyvf {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1 };

// One launch for the whole batch. Groups are contiguous runs of `group_size` when
// `offsets` is null, else order[offsets[k]:offsets[k + 1]] (identity when `order` is
// null). `mean_group_size` picks one thread, one warp or one block per group.
cudaError_t launch_grouped_advantages(const void* rewards, DType dtype, float* out, int64_t n_groups,
                                      int64_t group_size, const int64_t* offsets, const int64_t* order,
                                      double mean_group_size, int estimator, double eps,
                                      cudaStream_t stream);

// out[b] = sum of values[cu[b]:cu[b + 1]] where mask (null: everywhere); out is
// float32 for float32 values and float64 for float64 values.
cudaError_t launch_segment_sum(const void* values, DType dtype, void* out, const int64_t* cu,
                               const bool* mask, int64_t n_segments, double mean_segment_length,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace pyvf
