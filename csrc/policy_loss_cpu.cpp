// CPU path of policy_loss: the token chunks, GEMMs and row statistics of token_logprobs
// (pyvf/lm_head_cpu.h), but policy_loss knows its coefficients up front, so the same
// row pass writes dL/dz right after the statistics and the two GEMMs follow without a
// recompute (6NHV, where token_logprobs' forward and backward take 8NHV). Extra memory:
// O(N + chunk * V) plus, for half-precision inputs, fp32 copies of the weight and its
// gradient.
#include "ops.h"
#include "pyvf/lm_head_cpu.h"

#include <type_traits>

namespace pyvf {
namespace {

using namespace lm_head_cpu;

// policy_loss's row: statistics, then (need_grad) dL/dz in place for the coefficients
// c (log-prob) and *ec (entropy, when given). Without an entropy coefficient the
// statistics pass leaves exp(z - max) in the row and the gradient pass only scales it
// (p_j = exp(z_j - max) / sum): one exp per logit instead of two.
template <typename T>
PYVF_ROW_INLINE void policy_row_impl(T* row, int64_t v, T inv_temp, int64_t target, T c, const T* ec,
                                     bool need_grad, T* logp, T* lse, T* entropy) {
  const T z_target = row[target] * inv_temp;
  const bool reuse_exp = need_grad && ec == nullptr;
  const RowStats<T> st = row_stats(row, v, inv_temp, true, reuse_exp);
  *lse = st.lse;
  *logp = z_target - st.lse;
  *entropy = st.entropy;
  if (!need_grad) return;
  if (!reuse_exp) {
    grad_row_impl(row, v, inv_temp, target, c, st.lse, st.entropy, ec);
    return;
  }
  const T scale = static_cast<T>(-static_cast<double>(c) * inv_temp / st.sum);
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) row[j] *= scale;
  row[target] += c * inv_temp;
}

// The float entry point is cloned per x86-64 level (PYVF_ROW_CLONES, lm_head_cpu.h).
PYVF_ROW_CLONES void policy_row_f32(float* row, int64_t v, float inv_temp, int64_t target, float c, const float* ec,
                                    bool need_grad, float* logp, float* lse, float* entropy) {
  policy_row_impl(row, v, inv_temp, target, c, ec, need_grad, logp, lse, entropy);
}

template <typename T>
void policy_row(T* row, int64_t v, T inv_temp, int64_t target, T c, const T* ec, bool need_grad, T* logp, T* lse,
                T* entropy) {
  if constexpr (std::is_same_v<T, float>) {
    policy_row_f32(row, v, inv_temp, target, c, ec, need_grad, logp, lse, entropy);
  } else {
    policy_row_impl(row, v, inv_temp, target, c, ec, need_grad, logp, lse, entropy);
  }
}

}  // namespace

std::vector<torch::Tensor> policy_loss_cpu(const torch::Tensor& hidden, const torch::Tensor& weight,
                                           const torch::Tensor& targets, const torch::Tensor& coeffs,
                                           const std::optional<torch::Tensor>& entropy_coeffs, double inv_temp,
                                           bool need_d_hidden, bool need_d_weight, int64_t chunk_bytes) {
  check_inputs(hidden, weight, targets);
  const int64_t n = hidden.size(0), v = weight.size(0);
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.size(0) == n, "coeffs must be [N]");
  const bool with_entropy_grad = entropy_coeffs && entropy_coeffs->defined();
  TORCH_CHECK(!with_entropy_grad || (entropy_coeffs->dim() == 1 && entropy_coeffs->size(0) == n),
              "entropy_coeffs must be [N]");
  const bool need_grad = need_d_hidden || need_d_weight;
  const auto ct = compute_dtype(hidden);
  // Detached: the row blocks call ATen from OpenMP threads, outside autograd.
  const auto h_c = hidden.detach().to(ct).contiguous();
  const auto w_c = weight.detach().to(ct).contiguous();
  const auto w_t = w_c.t();
  const auto tgt = targets.contiguous();
  const auto c_c = coeffs.detach().to(ct).contiguous();
  const auto e_c = with_entropy_grad ? entropy_coeffs->detach().to(ct).contiguous() : torch::Tensor();
  auto opts = hidden.options().dtype(ct).requires_grad(false);
  auto logp = torch::empty({n}, opts), lse = torch::empty({n}, opts), entropy = torch::empty({n}, opts);
  auto d_hidden = need_d_hidden ? torch::empty({n, hidden.size(1)}, opts) : torch::Tensor();
  // Written by the first chunk's GEMM, accumulated into by the others: no zero fill.
  auto d_weight = !need_d_weight ? torch::Tensor()
                  : n == 0 ? torch::zeros({v, hidden.size(1)}, opts) : torch::empty({v, hidden.size(1)}, opts);
  const int64_t rows = chunk_rows(n, v, chunk_bytes, c10::elementSize(ct));
  auto buffer = torch::empty({rows, v}, opts);

  AT_DISPATCH_FLOATING_TYPES(ct, "policy_loss_cpu", [&] {
    const scalar_t it = static_cast<scalar_t>(inv_temp);
    const int64_t* t = tgt.data_ptr<int64_t>();
    const scalar_t* cf = c_c.data_ptr<scalar_t>();
    const scalar_t* ecf = with_entropy_grad ? e_c.data_ptr<scalar_t>() : nullptr;
    scalar_t* lp = logp.data_ptr<scalar_t>();
    scalar_t* ls = lse.data_ptr<scalar_t>();
    scalar_t* en = entropy.data_ptr<scalar_t>();
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t c = std::min(rows, n - r0);
      auto logits = buffer.narrow(0, 0, c);
      const auto h_chunk = h_c.narrow(0, r0, c);
      // Logits, the row pass and d_hidden of a block of rows need only those rows: one
      // parallel region for the three.
      for_row_blocks(c, [&](int64_t a, int64_t b) {
        auto z = logits.narrow(0, a, b - a);
        at::mm_out(z, h_chunk.narrow(0, a, b - a), w_t);
        scalar_t* zp = z.data_ptr<scalar_t>();
        for (int64_t i = a; i < b; ++i) {
          const int64_t g = r0 + i;
          policy_row(zp + (i - a) * v, v, it, t[g], cf[g], ecf ? ecf + g : nullptr, need_grad, lp + g, ls + g,
                     en + g);
        }
        if (need_d_hidden) {
          auto d_hidden_block = d_hidden.narrow(0, r0 + a, b - a);
          mm_blocked_k(d_hidden_block, z, w_c);
        }
      });
      // d_weight sums over the chunk's rows: one GEMM over all of them.
      if (!need_d_weight) continue;
      if (r0 == 0) {
        at::mm_out(d_weight, logits.t(), h_chunk);
      } else {
        d_weight.addmm_(logits.t(), h_chunk);
      }
    }
  });
  return {logp, entropy, need_d_hidden ? d_hidden.to(hidden.scalar_type()) : torch::Tensor(),
          need_d_weight ? d_weight.to(weight.scalar_type()) : torch::Tensor()};
}

}  // namespace pyvf
