// CPU implementations of the segment-and-group ops: one OpenMP loop over groups
// (or segments), the per-group arithmetic from group_math.h.
#include "ops.h"

#include "pyvf/group_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyvf {
namespace {

// Groups differ in size (ragged ids, one huge group among small ones), so chunks are
// handed out dynamically rather than split evenly up front.
#define PYVF_OMP_FOR _Pragma("omp parallel for schedule(dynamic, 64) num_threads(at::get_num_threads())")

template <typename scalar_t>
void grouped_advantages_kernel(const scalar_t* rewards, float* out, int64_t n_groups,
                               int64_t group_size, const int64_t* offsets, const int64_t* order,
                               Estimator estimator, double eps) {
  PYVF_OMP_FOR
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t begin = offsets ? offsets[g] : g * group_size;
    const int64_t end = offsets ? offsets[g + 1] : begin + group_size;
    auto at = [&](int64_t k) { return order ? order[k] : k; };

    GroupStats s = stats_empty();
    for (int64_t k = begin; k < end; ++k) stats_add(s, static_cast<double>(rewards[at(k)]));
    if (estimator_needs_m2(estimator)) {
      const double mean = stats_mean(s);
      for (int64_t k = begin; k < end; ++k)
        s.m2 += squared_deviation(static_cast<double>(rewards[at(k)]), mean);
    }
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i = at(k);
      out[i] = static_cast<float>(advantage(estimator, static_cast<double>(rewards[i]), s, eps));
    }
  }
}

template <typename scalar_t, typename out_t>
void segment_sum_kernel(const scalar_t* values, const int64_t* cu, const bool* mask, out_t* out,
                        int64_t n_segments) {
  PYVF_OMP_FOR
  for (int64_t b = 0; b < n_segments; ++b) {
    double acc = 0.0;
    for (int64_t t = cu[b]; t < cu[b + 1]; ++t)
      if (!mask || mask[t]) acc += static_cast<double>(values[t]);
    out[b] = static_cast<out_t>(acc);
  }
}

}  // namespace

GroupLayout group_layout(const torch::Tensor& rewards, int64_t group_size,
                         const std::optional<torch::Tensor>& offsets, const std::optional<torch::Tensor>& order) {
  const int64_t B = rewards.numel();
  GroupLayout layout{0, group_size, nullptr, nullptr};
  if (!(offsets && offsets->defined())) {
    TORCH_CHECK(group_size >= 1 && B % group_size == 0, "group_size must divide B");
    layout.n_groups = B / group_size;
    return layout;
  }
  TORCH_CHECK(offsets->device() == rewards.device() && offsets->scalar_type() == torch::kLong &&
                  offsets->is_contiguous() && offsets->numel() >= 1,
              "offsets must be contiguous int64 on the rewards' device");
  layout.n_groups = offsets->numel() - 1;
  layout.offsets = offsets->data_ptr<int64_t>();
  if (order && order->defined()) {
    TORCH_CHECK(order->device() == rewards.device() && order->scalar_type() == torch::kLong &&
                    order->numel() == B && order->is_contiguous(),
                "order must be contiguous int64 of length B on the rewards' device");
    layout.order = order->data_ptr<int64_t>();
  }
  return layout;
}

torch::Tensor grouped_advantages_cpu(const torch::Tensor& rewards, int64_t group_size,
                                     const std::optional<torch::Tensor>& offsets,
                                     const std::optional<torch::Tensor>& order,
                                     int64_t estimator, double eps) {
  TORCH_CHECK(rewards.dim() == 1 && rewards.is_contiguous(), "rewards must be contiguous 1-D");
  const int64_t B = rewards.numel();
  auto out = torch::empty({B}, rewards.options().dtype(torch::kFloat));
  if (B == 0) return out;
  const GroupLayout g = group_layout(rewards, group_size, offsets, order);
  TORCH_CHECK(!g.offsets || (g.offsets[0] == 0 && g.offsets[g.n_groups] == B), "offsets must span [0, B]");
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "grouped_advantages_cpu", [&] {
    grouped_advantages_kernel<scalar_t>(rewards.data_ptr<scalar_t>(), out.data_ptr<float>(), g.n_groups,
                                        g.group_size, g.offsets, g.order, static_cast<Estimator>(estimator), eps);
  });
  return out;
}

torch::Tensor segment_sum_cpu(const torch::Tensor& values, const torch::Tensor& cu_seqlens,
                              const std::optional<torch::Tensor>& mask) {
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values must be contiguous 1-D");
  TORCH_CHECK(cu_seqlens.scalar_type() == torch::kLong && cu_seqlens.is_contiguous() && cu_seqlens.numel() >= 1,
              "cu_seqlens must be contiguous int64 with at least one entry");
  const int64_t n_segments = cu_seqlens.numel() - 1;
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  TORCH_CHECK(cu[0] == 0 && cu[n_segments] == values.numel(), "cu_seqlens must span [0, len(values)]");
  const bool* mask_ptr = nullptr;
  if (mask && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->numel() == values.numel() && mask->is_contiguous(),
                "mask must be contiguous bool of length len(values)");
    mask_ptr = mask->data_ptr<bool>();
  }
  const auto out_dtype = values.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto out = torch::empty({n_segments}, values.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "segment_sum_cpu", [&] {
    if (out_dtype == torch::kDouble)
      segment_sum_kernel<scalar_t, double>(values.data_ptr<scalar_t>(), cu, mask_ptr, out.data_ptr<double>(), n_segments);
    else
      segment_sum_kernel<scalar_t, float>(values.data_ptr<scalar_t>(), cu, mask_ptr, out.data_ptr<float>(), n_segments);
  });
  return out;
}

}  // namespace pyvf
