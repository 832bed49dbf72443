// Host entry points of pyvf._C. Each op has a CPU implementation (csrc/*_cpu.cpp)
// and, when built with CUDA, a CUDA one (csrc/cuda_ops.cpp launching kernels/cuda/).
// Inputs arrive validated and contiguous from pyvf/ops; these functions only check
// the invariants whose violation would read out of bounds.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace pyvf {

// How grouped_advantages' groups lie in the rewards: contiguous runs of group_size
// (offsets null), or order[offsets[k]:offsets[k + 1]] (identity when order is null).
struct GroupLayout {
  int64_t n_groups;
  int64_t group_size;
  const int64_t* offsets;
  const int64_t* order;
};

// Checks the layout arguments against rewards (dtype, length, device) without
// reading device memory; shared by the CPU and CUDA entry points.
GroupLayout group_layout(const torch::Tensor& rewards, int64_t group_size,
                         const std::optional<torch::Tensor>& offsets, const std::optional<torch::Tensor>& order);

// rewards [B] float32/float64. Groups are either contiguous runs of `group_size`
// (offsets empty) or, with `offsets` [n_groups + 1] int64, the positions
// order[offsets[k]:offsets[k + 1]] (identity when `order` is empty).
torch::Tensor grouped_advantages_cpu(const torch::Tensor& rewards, int64_t group_size,
                                     const std::optional<torch::Tensor>& offsets,
                                     const std::optional<torch::Tensor>& order,
                                     int64_t estimator, double eps);

// values [T] float32/float64, cu_seqlens [B + 1] int64, mask [T] bool or empty.
torch::Tensor segment_sum_cpu(const torch::Tensor& values, const torch::Tensor& cu_seqlens,
                              const std::optional<torch::Tensor>& mask);

// token_logprobs on the CPU. hidden [N, H] and weight [V, H] (any floating dtype;
// computed in fp32, or fp64 for fp64), targets [N] int64 all in [0, V) (ignored rows
// are dropped by the caller). chunk_bytes bounds the [chunk, V] logits buffer.
// forward -> {logp, lse, entropy (empty unless with_entropy)} in the compute dtype.
std::vector<torch::Tensor> token_logprobs_forward_cpu(const torch::Tensor& hidden, const torch::Tensor& weight,
                                                      const torch::Tensor& targets, double inv_temp,
                                                      bool with_entropy, int64_t chunk_bytes);
// backward -> {d_hidden, d_weight} in the inputs' dtypes.
std::vector<torch::Tensor> token_logprobs_backward_cpu(const torch::Tensor& hidden, const torch::Tensor& weight,
                                                       const torch::Tensor& targets, const torch::Tensor& lse,
                                                       const std::optional<torch::Tensor>& entropy,
                                                       const torch::Tensor& grad_logp,
                                                       const std::optional<torch::Tensor>& grad_entropy,
                                                       double inv_temp, int64_t chunk_bytes);

// policy_loss on the CPU: the forward values and the gradients of
// sum_t coeffs[t] * logp[t] + sum_t entropy_coeffs[t] * entropy[t] in one pass per row
// chunk (no recompute). Same input contract as token_logprobs (all rows valid);
// coeffs/entropy_coeffs [N]. -> {logp, entropy (compute dtype), d_hidden, d_weight
// (inputs' dtypes; undefined when not asked for)}.
std::vector<torch::Tensor> policy_loss_cpu(const torch::Tensor& hidden, const torch::Tensor& weight,
                                           const torch::Tensor& targets, const torch::Tensor& coeffs,
                                           const std::optional<torch::Tensor>& entropy_coeffs, double inv_temp,
                                           bool need_d_hidden, bool need_d_weight, int64_t chunk_bytes);

#ifdef PYVF_WITH_CUDA
torch::Tensor grouped_advantages_cuda(const torch::Tensor& rewards, int64_t group_size,
                                      const std::optional<torch::Tensor>& offsets,
                                      const std::optional<torch::Tensor>& order,
                                      int64_t estimator, double eps);
torch::Tensor segment_sum_cuda(const torch::Tensor& values, const torch::Tensor& cu_seqlens,
                               const std::optional<torch::Tensor>& mask);
#endif

}  // namespace pyvf
