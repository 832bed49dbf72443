// Per-group arithmetic shared by the CPU (csrc/) and CUDA (kernels/cuda/) builds.
//
// Everything here is a header-only __host__ __device__ inline function, so the CPU
// tests exercise exactly the arithmetic the GPU runs. Accumulation is in double:
// these reductions are memory-bound, and a single group can hold 10^6 rewards, where
// a float sum would lose the 1e-5 relative accuracy the ops promise.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PYVF_HD __host__ __device__ __forceinline__
#else
#define PYVF_HD inline
#endif

namespace pyvf {

// Must match pyvf/ops/grouped_advantages.py::_ESTIMATORS.
enum class Estimator : int { kRloo = 0, kGrpo = 1, kDrGrpo = 2 };

// Running statistics of the non-NaN rewards of one group. `m2` (the sum of squared
// deviations) is filled by a second pass once the mean is known: two passes are
// exact for equal rewards, where a one-pass formula leaves rounding noise that eps
// would then amplify.
struct GroupStats {
  double count;
  double sum;
  double lo;
  double hi;
  double m2;
};

PYVF_HD GroupStats stats_empty() {
  GroupStats s;
  s.count = 0.0;
  s.sum = 0.0;
  s.lo = INFINITY;
  s.hi = -INFINITY;
  s.m2 = 0.0;
  return s;
}

PYVF_HD void stats_add(GroupStats& s, double r) {
  if (std::isnan(r)) return;
  s.count += 1.0;
  s.sum += r;
  s.lo = r < s.lo ? r : s.lo;
  s.hi = r > s.hi ? r : s.hi;
}

PYVF_HD GroupStats stats_merge(const GroupStats& a, const GroupStats& b) {
  GroupStats s;
  s.count = a.count + b.count;
  s.sum = a.sum + b.sum;
  s.lo = a.lo < b.lo ? a.lo : b.lo;
  s.hi = a.hi > b.hi ? a.hi : b.hi;
  s.m2 = a.m2 + b.m2;
  return s;
}

PYVF_HD double stats_mean(const GroupStats& s) {
  return s.count > 0.0 ? s.sum / s.count : 0.0;
}

// Contribution of one reward to the second pass.
PYVF_HD double squared_deviation(double r, double mean) {
  if (std::isnan(r)) return 0.0;
  const double d = r - mean;
  return d * d;
}

// Only the grpo estimator divides by the spread, so only it needs the second pass.
PYVF_HD bool estimator_needs_m2(Estimator e) { return e == Estimator::kGrpo; }

// The advantage of reward `r` in a group with statistics `s` (m2 filled when the
// estimator needs it). NaN rewards, groups with fewer than two valid rewards and
// groups whose valid rewards are all equal give exactly 0.
PYVF_HD double advantage(Estimator e, double r, const GroupStats& s, double eps) {
  if (std::isnan(r) || s.count < 2.0 || s.lo == s.hi) return 0.0;
  const double mean = s.sum / s.count;
  switch (e) {
    case Estimator::kRloo:
      // r - mean of the others == n / (n - 1) * (r - mean)
      return (r - mean) * (s.count / (s.count - 1.0));
    case Estimator::kGrpo: {
      const double std_unbiased = sqrt(s.m2 / (s.count - 1.0));
      return (r - mean) / (std_unbiased + eps);
    }
    case Estimator::kDrGrpo:
    default:
      return r - mean;
  }
}

}  // namespace pyvf
