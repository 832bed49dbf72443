// Segmented reductions on the GPU: grouped advantages and segment sums.
//
// One launch covers the whole batch. The work unit per group (or segment) is a
// thread, a warp or a block, picked from the mean group size: contiguous groups of
// 8 want a thread each (a warp would idle 24 lanes), a single group of 10^6 wants a
// whole block. Every variant loops, so any size is correct under any choice; the
// choice only sets speed. The per-group arithmetic is group_math.h, shared with the
// CPU build.
#include "launchers.h"

#include "pyvf/group_math.h"

namespace pyvf {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr unsigned kFullMask = 0xffffffffu;

struct Sum {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct Min {
  __device__ double operator()(double a, double b) const { return a < b ? a : b; }
};
struct Max {
  __device__ double operator()(double a, double b) const { return a > b ? a : b; }
};

// Reduces `v` across the TPG threads that share a group (TPG <= 32: lanes of one
// warp; TPG == kBlock: the whole block) and returns the result to all of them.
template <int TPG, typename Op>
__device__ double group_reduce(double v, Op op, double identity) {
  if constexpr (TPG == 1) {
    return v;
  } else if constexpr (TPG <= 32) {
    for (int width = TPG / 2; width > 0; width /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, width));
    return v;
  } else {
    static_assert(TPG == kBlock, "block reduction assumes TPG == kBlock");
    __shared__ double partial[kBlock / 32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    for (int width = 16; width > 0; width /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, width));
    __syncthreads();  // an earlier call may still be reading `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < kBlock / 32 ? partial[lane] : identity;
    for (int width = 16; width > 0; width /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, width));
    return v;
  }
}

template <int TPG>
__device__ GroupStats reduce_stats(GroupStats s) {
  s.count = group_reduce<TPG>(s.count, Sum(), 0.0);
  s.sum = group_reduce<TPG>(s.sum, Sum(), 0.0);
  s.lo = group_reduce<TPG>(s.lo, Min(), INFINITY);
  s.hi = group_reduce<TPG>(s.hi, Max(), -INFINITY);
  return s;
}

// Index of this thread's group and its rank within the group.
template <int TPG>
__device__ void locate(int64_t& group, int& rank) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  group = tid / TPG;
  rank = static_cast<int>(tid % TPG);
}

template <int TPG, typename scalar_t>
__global__ void __launch_bounds__(kBlock)
grouped_advantages_kernel(const scalar_t* __restrict__ rewards, float* __restrict__ out, int64_t n_groups,
                          int64_t group_size, const int64_t* __restrict__ offsets,
                          const int64_t* __restrict__ order, Estimator estimator, double eps) {
  int64_t g;
  int rank;
  locate<TPG>(g, rank);
  // Whole warps (whole blocks for TPG == kBlock) share g, so this exit keeps the
  // shuffles below convergent.
  if (g >= n_groups) return;
  const int64_t begin = offsets ? offsets[g] : g * group_size;
  const int64_t end = offsets ? offsets[g + 1] : begin + group_size;
  auto at = [&](int64_t k) { return order ? order[k] : k; };

  GroupStats s = stats_empty();
  for (int64_t k = begin + rank; k < end; k += TPG) stats_add(s, static_cast<double>(rewards[at(k)]));
  s = reduce_stats<TPG>(s);
  if (estimator_needs_m2(estimator)) {
    const double mean = stats_mean(s);
    double m2 = 0.0;
    for (int64_t k = begin + rank; k < end; k += TPG)
      m2 += squared_deviation(static_cast<double>(rewards[at(k)]), mean);
    s.m2 = group_reduce<TPG>(m2, Sum(), 0.0);
  }
  for (int64_t k = begin + rank; k < end; k += TPG) {
    const int64_t i = at(k);
    out[i] = static_cast<float>(advantage(estimator, static_cast<double>(rewards[i]), s, eps));
  }
}

template <int TPG, typename scalar_t>
__global__ void __launch_bounds__(kBlock)
segment_sum_kernel(const scalar_t* __restrict__ values, const int64_t* __restrict__ cu,
                   const bool* __restrict__ mask, scalar_t* __restrict__ out, int64_t n_segments) {
  int64_t b;
  int rank;
  locate<TPG>(b, rank);
  if (b >= n_segments) return;
  double acc = 0.0;
  for (int64_t t = cu[b] + rank; t < cu[b + 1]; t += TPG)
    if (!mask || mask[t]) acc += static_cast<double>(values[t]);
  acc = group_reduce<TPG>(acc, Sum(), 0.0);
  if (rank == 0) out[b] = static_cast<scalar_t>(acc);
}

template <int TPG>
unsigned blocks_for(int64_t n_units) {
  const int64_t threads = n_units * TPG;
  return static_cast<unsigned>((threads + kBlock - 1) / kBlock);
}

// Calls f(std::integral_constant<int, TPG>) for the work unit that suits `mean_size`.
template <typename F>
void with_threads_per_group(double mean_size, F&& f) {
  if (mean_size <= 16.0)
    f(std::integral_constant<int, 1>());
  else if (mean_size <= 2048.0)
    f(std::integral_constant<int, 32>());
  else
    f(std::integral_constant<int, kBlock>());
}

}  // namespace

cudaError_t launch_grouped_advantages(const void* rewards, DType dtype, float* out, int64_t n_groups,
                                      int64_t group_size, const int64_t* offsets, const int64_t* order,
                                      double mean_group_size, int estimator, double eps,
                                      cudaStream_t stream) {
  if (n_groups == 0) return cudaSuccess;
  const auto est = static_cast<Estimator>(estimator);
  with_threads_per_group(mean_group_size, [&](auto tpg) {
    constexpr int TPG = decltype(tpg)::value;
    const unsigned blocks = blocks_for<TPG>(n_groups);
    if (dtype == DType::kFloat64)
      grouped_advantages_kernel<TPG, double><<<blocks, kBlock, 0, stream>>>(
          static_cast<const double*>(rewards), out, n_groups, group_size, offsets, order, est, eps);
    else
      grouped_advantages_kernel<TPG, float><<<blocks, kBlock, 0, stream>>>(
          static_cast<const float*>(rewards), out, n_groups, group_size, offsets, order, est, eps);
  });
  return cudaGetLastError();
}

cudaError_t launch_segment_sum(const void* values, DType dtype, void* out, const int64_t* cu,
                               const bool* mask, int64_t n_segments, double mean_segment_length,
                               cudaStream_t stream) {
  if (n_segments == 0) return cudaSuccess;
  with_threads_per_group(mean_segment_length, [&](auto tpg) {
    constexpr int TPG = decltype(tpg)::value;
    const unsigned blocks = blocks_for<TPG>(n_segments);
    if (dtype == DType::kFloat64)
      segment_sum_kernel<TPG, double><<<blocks, kBlock, 0, stream>>>(
          static_cast<const double*>(values), cu, mask, static_cast<double*>(out), n_segments);
    else
      segment_sum_kernel<TPG, float><<<blocks, kBlock, 0, stream>>>(
          static_cast<const float*>(values), cu, mask, static_cast<float*>(out), n_segments);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pyvf
