// CPU path of token_logprobs: token chunks, one GEMM per chunk into a [chunk, V]
// buffer, then a fused pass per row (OpenMP) for log-sum-exp, the target logit and the
// entropy. The backward recomputes each chunk's logits and turns them into dL/dz in
// place before two GEMMs (8NHV in all). Extra memory: O(N + chunk * V) plus, for
// half-precision inputs, fp32 copies of the weight and its gradient. The row math it
// shares with policy_loss (csrc/policy_loss_cpu.cpp) is in pyvf/lm_head_cpu.h.
#include "ops.h"
#include "pyvf/lm_head_cpu.h"

#include <type_traits>

namespace pyvf {
namespace {

using namespace lm_head_cpu;

// token_logprobs' forward row: log-prob of the target, lse, entropy (when asked).
template <typename T>
PYVF_ROW_INLINE void forward_row_impl(T* row, int64_t v, T inv_temp, int64_t target, T* logp, T* lse, T* entropy) {
  const RowStats<T> st = row_stats(row, v, inv_temp, entropy != nullptr, false);
  *lse = st.lse;
  *logp = row[target] * inv_temp - st.lse;
  if (entropy) *entropy = st.entropy;
}

// Entry points per row: the float ones are cloned per x86-64 level (PYVF_ROW_CLONES, lm_head_cpu.h).

PYVF_ROW_CLONES void forward_row_f32(float* row, int64_t v, float inv_temp, int64_t target, float* logp, float* lse,
                                     float* entropy) {
  forward_row_impl(row, v, inv_temp, target, logp, lse, entropy);
}
PYVF_ROW_CLONES void grad_row_f32(float* row, int64_t v, float inv_temp, int64_t target, float g, float lse,
                                  float entropy, const float* grad_entropy) {
  grad_row_impl(row, v, inv_temp, target, g, lse, entropy, grad_entropy);
}

template <typename T>
void forward_row(T* row, int64_t v, T inv_temp, int64_t target, T* logp, T* lse, T* entropy) {
  if constexpr (std::is_same_v<T, float>) {
    forward_row_f32(row, v, inv_temp, target, logp, lse, entropy);
  } else {
    forward_row_impl(row, v, inv_temp, target, logp, lse, entropy);
  }
}
template <typename T>
void grad_row(T* row, int64_t v, T inv_temp, int64_t target, T g, T lse, T entropy, const T* grad_entropy) {
  if constexpr (std::is_same_v<T, float>) {
    grad_row_f32(row, v, inv_temp, target, g, lse, entropy, grad_entropy);
  } else {
    grad_row_impl(row, v, inv_temp, target, g, lse, entropy, grad_entropy);
  }
}

}  // namespace

std::vector<torch::Tensor> token_logprobs_forward_cpu(const torch::Tensor& hidden, const torch::Tensor& weight,
                                                      const torch::Tensor& targets, double inv_temp,
                                                      bool with_entropy, int64_t chunk_bytes) {
  check_inputs(hidden, weight, targets);
  const auto ct = compute_dtype(hidden);
  const int64_t n = hidden.size(0), v = weight.size(0);
  // Detached: the row blocks call ATen from OpenMP threads, outside autograd.
  const auto h_c = hidden.detach().to(ct).contiguous();
  const auto w_t = weight.detach().to(ct).t();
  const auto tgt = targets.contiguous();
  auto opts = hidden.options().dtype(ct).requires_grad(false);
  auto logp = torch::empty({n}, opts), lse = torch::empty({n}, opts);
  auto entropy = torch::zeros({with_entropy ? n : 0}, opts);
  const int64_t rows = chunk_rows(n, v, chunk_bytes, c10::elementSize(ct));
  auto buffer = torch::empty({rows, v}, opts);

  AT_DISPATCH_FLOATING_TYPES(ct, "token_logprobs_forward_cpu", [&] {
    const scalar_t it = static_cast<scalar_t>(inv_temp);
    const int64_t* t = tgt.data_ptr<int64_t>();
    scalar_t* lp = logp.data_ptr<scalar_t>();
    scalar_t* ls = lse.data_ptr<scalar_t>();
    scalar_t* en = with_entropy ? entropy.data_ptr<scalar_t>() : nullptr;
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t c = std::min(rows, n - r0);
      auto logits = buffer.narrow(0, 0, c);
      const auto h_chunk = h_c.narrow(0, r0, c);
      // A block's logits and row pass need only its rows: one parallel region for both.
      for_row_blocks(c, [&](int64_t a, int64_t b) {
        auto z = logits.narrow(0, a, b - a);
        at::mm_out(z, h_chunk.narrow(0, a, b - a), w_t);
        scalar_t* zp = z.data_ptr<scalar_t>();
        for (int64_t i = a; i < b; ++i) {
          const int64_t g = r0 + i;
          forward_row(zp + (i - a) * v, v, it, t[g], lp + g, ls + g, en ? en + g : nullptr);
        }
      });
    }
  });
  return {logp, lse, entropy};
}

std::vector<torch::Tensor> token_logprobs_backward_cpu(const torch::Tensor& hidden, const torch::Tensor& weight,
                                                       const torch::Tensor& targets, const torch::Tensor& lse,
                                                       const std::optional<torch::Tensor>& entropy,
                                                       const torch::Tensor& grad_logp,
                                                       const std::optional<torch::Tensor>& grad_entropy,
                                                       double inv_temp, int64_t chunk_bytes) {
  check_inputs(hidden, weight, targets);
  const bool with_entropy = grad_entropy && grad_entropy->defined();
  TORCH_CHECK(!with_entropy || (entropy && entropy->defined()), "grad_entropy needs the forward's entropy");
  const auto ct = compute_dtype(hidden);
  const int64_t n = hidden.size(0), v = weight.size(0);
  // Detached: the row blocks call ATen from OpenMP threads, outside autograd.
  const auto h_c = hidden.detach().to(ct).contiguous();
  const auto w_c = weight.detach().to(ct).contiguous();
  const auto w_t = w_c.t();
  const auto tgt = targets.contiguous();
  const auto lse_c = lse.detach().to(ct).contiguous();
  const auto g_c = grad_logp.detach().to(ct).contiguous();
  const auto ent_c = with_entropy ? entropy->detach().to(ct).contiguous() : torch::Tensor();
  const auto ge_c = with_entropy ? grad_entropy->detach().to(ct).contiguous() : torch::Tensor();
  auto opts = hidden.options().dtype(ct).requires_grad(false);
  auto d_hidden = torch::empty({n, hidden.size(1)}, opts);
  // Written by the first chunk's GEMM, accumulated into by the others: no zero fill.
  auto d_weight = n == 0 ? torch::zeros({v, hidden.size(1)}, opts) : torch::empty({v, hidden.size(1)}, opts);
  const int64_t rows = chunk_rows(n, v, chunk_bytes, c10::elementSize(ct));
  auto buffer = torch::empty({rows, v}, opts);

  AT_DISPATCH_FLOATING_TYPES(ct, "token_logprobs_backward_cpu", [&] {
    const scalar_t it = static_cast<scalar_t>(inv_temp);
    const int64_t* t = tgt.data_ptr<int64_t>();
    const scalar_t* ls = lse_c.data_ptr<scalar_t>();
    const scalar_t* gl = g_c.data_ptr<scalar_t>();
    const scalar_t* en = with_entropy ? ent_c.data_ptr<scalar_t>() : nullptr;
    const scalar_t* ge = with_entropy ? ge_c.data_ptr<scalar_t>() : nullptr;
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t c = std::min(rows, n - r0);
      auto dz = buffer.narrow(0, 0, c);
      const auto h_chunk = h_c.narrow(0, r0, c);
      // Recomputed logits, dL/dz and d_hidden of a block need only its rows: one
      // parallel region for the three.
      for_row_blocks(c, [&](int64_t a, int64_t b) {
        auto z = dz.narrow(0, a, b - a);
        at::mm_out(z, h_chunk.narrow(0, a, b - a), w_t);
        scalar_t* zp = z.data_ptr<scalar_t>();
        for (int64_t i = a; i < b; ++i) {
          const int64_t g = r0 + i;
          grad_row(zp + (i - a) * v, v, it, t[g], gl[g], ls[g], en ? en[g] : scalar_t(0), ge ? ge + g : nullptr);
        }
        auto d_hidden_block = d_hidden.narrow(0, r0 + a, b - a);
        mm_blocked_k(d_hidden_block, z, w_c);
      });
      // d_weight sums over the chunk's rows: one GEMM over all of them.
      if (r0 == 0) {
        at::mm_out(d_weight, dz.t(), h_chunk);
      } else {
        d_weight.addmm_(dz.t(), h_chunk);
      }
    }
  });
  return {d_hidden.to(hidden.scalar_type()), d_weight.to(weight.scalar_type())};
}

}  // namespace pyvf
