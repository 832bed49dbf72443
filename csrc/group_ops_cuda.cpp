// Tensor-level wrappers around the CUDA launchers (built only with CUDA).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "launchers.h"
#include "ops.h"

namespace pyvf {
namespace {

cuda::DType launcher_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kDouble ? cuda::DType::kFloat64 : cuda::DType::kFloat32;
}

// pyvf/ops widens half-precision inputs to float32 before calling in.
void check_input(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D CUDA tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble, name,
              " must be float32 or float64");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

torch::Tensor grouped_advantages_cuda(const torch::Tensor& rewards, int64_t group_size,
                                      const std::optional<torch::Tensor>& offsets,
                                      const std::optional<torch::Tensor>& order,
                                      int64_t estimator, double eps) {
  check_input(rewards, "rewards");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.numel();
  auto out = torch::empty({B}, rewards.options().dtype(torch::kFloat));
  if (B == 0) return out;

  const GroupLayout g = group_layout(rewards, group_size, offsets, order);
  const int64_t n_groups = g.n_groups;
  const double mean_size = n_groups > 0 ? static_cast<double>(B) / n_groups : 0.0;
  check_launch(cuda::launch_grouped_advantages(rewards.data_ptr(), launcher_dtype(rewards), out.data_ptr<float>(),
                                               n_groups, g.group_size, g.offsets, g.order, mean_size,
                                               static_cast<int>(estimator), eps,
                                               c10::cuda::getCurrentCUDAStream()),
               "grouped_advantages kernel");
  return out;
}

torch::Tensor segment_sum_cuda(const torch::Tensor& values, const torch::Tensor& cu_seqlens,
                               const std::optional<torch::Tensor>& mask) {
  check_input(values, "values");
  TORCH_CHECK(cu_seqlens.is_cuda() && cu_seqlens.scalar_type() == torch::kLong && cu_seqlens.is_contiguous(),
              "cu_seqlens must be contiguous int64 on the values' device");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t n_segments = cu_seqlens.numel() - 1;
  auto out = torch::empty({n_segments}, values.options());
  const bool* mask_ptr = nullptr;
  if (mask && mask->defined()) {
    TORCH_CHECK(mask->is_cuda() && mask->scalar_type() == torch::kBool && mask->numel() == values.numel() &&
                    mask->is_contiguous(),
                "mask must be contiguous bool of length len(values) on the values' device");
    mask_ptr = mask->data_ptr<bool>();
  }
  const double mean_len = n_segments > 0 ? static_cast<double>(values.numel()) / n_segments : 0.0;
  check_launch(cuda::launch_segment_sum(values.data_ptr(), launcher_dtype(values), out.data_ptr(),
                                        cu_seqlens.data_ptr<int64_t>(), mask_ptr, n_segments, mean_len,
                                        c10::cuda::getCurrentCUDAStream()),
               "segment_sum kernel");
  return out;
}

}  // namespace pyvf
