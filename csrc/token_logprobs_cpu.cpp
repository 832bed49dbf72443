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

// One pass per row of a [c, v] logits chunk: log-prob of the target, lse, entropy.
template <typename T>
void forward_rows(T* logits, int64_t c, int64_t v, T inv_temp, const int64_t* targets, T* logp, T* lse,
                  T* entropy) {
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < c; ++i)
    forward_row(logits + i * v, v, inv_temp, targets[i], logp + i, lse + i, entropy ? entropy + i : nullptr);
}

// Turns a [c, v] logits chunk into dL/dz in place (token_logprobs' backward).
template <typename T>
void backward_rows(T* logits, int64_t c, int64_t v, T inv_temp, const int64_t* targets, const T* lse,
                   const T* grad_logp, const T* entropy, const T* grad_entropy) {
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < c; ++i)
    grad_row(logits + i * v, v, inv_temp, targets[i], grad_logp[i], lse[i], grad_entropy ? entropy[i] : T(0),
             grad_entropy ? grad_entropy + i : nullptr);
}

}  // namespace

std::vector<torch::Tensor> token_logprobs_forward_cpu(const torch::Tensor& hidden, const torch::Tensor& weight,
                                                      const torch::Tensor& targets, double inv_temp,
                                                      bool with_entropy, int64_t chunk_bytes) {
  check_inputs(hidden, weight, targets);
  const auto ct = compute_dtype(hidden);
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto h_c = hidden.to(ct).contiguous();
  const auto w_t = weight.to(ct).t();
  const auto tgt = targets.contiguous();
  auto opts = hidden.options().dtype(ct);
  auto logp = torch::empty({n}, opts), lse = torch::empty({n}, opts);
  auto entropy = torch::zeros({with_entropy ? n : 0}, opts);
  const int64_t rows = chunk_rows(n, v, chunk_bytes, c10::elementSize(ct));
  auto buffer = torch::empty({rows, v}, opts);

  AT_DISPATCH_FLOATING_TYPES(ct, "token_logprobs_forward_cpu", [&] {
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t c = std::min(rows, n - r0);
      auto logits = buffer.narrow(0, 0, c);
      at::mm_out(logits, h_c.narrow(0, r0, c), w_t);
      forward_rows<scalar_t>(logits.data_ptr<scalar_t>(), c, v, static_cast<scalar_t>(inv_temp),
                             tgt.data_ptr<int64_t>() + r0, logp.data_ptr<scalar_t>() + r0,
                             lse.data_ptr<scalar_t>() + r0,
                             with_entropy ? entropy.data_ptr<scalar_t>() + r0 : nullptr);
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
  const auto h_c = hidden.to(ct).contiguous();
  const auto w_c = weight.to(ct).contiguous();
  const auto tgt = targets.contiguous();
  const auto lse_c = lse.to(ct).contiguous();
  const auto g_c = grad_logp.to(ct).contiguous();
  const auto ent_c = with_entropy ? entropy->to(ct).contiguous() : torch::Tensor();
  const auto ge_c = with_entropy ? grad_entropy->to(ct).contiguous() : torch::Tensor();
  auto opts = hidden.options().dtype(ct);
  auto d_hidden = torch::empty({n, hidden.size(1)}, opts);
  auto d_weight = torch::zeros({v, hidden.size(1)}, opts);
  const int64_t rows = chunk_rows(n, v, chunk_bytes, c10::elementSize(ct));
  auto buffer = torch::empty({rows, v}, opts);

  AT_DISPATCH_FLOATING_TYPES(ct, "token_logprobs_backward_cpu", [&] {
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t c = std::min(rows, n - r0);
      auto dz = buffer.narrow(0, 0, c);
      const auto h_chunk = h_c.narrow(0, r0, c);
      at::mm_out(dz, h_chunk, w_c.t());
      backward_rows<scalar_t>(dz.data_ptr<scalar_t>(), c, v, static_cast<scalar_t>(inv_temp),
                              tgt.data_ptr<int64_t>() + r0, lse_c.data_ptr<scalar_t>() + r0,
                              g_c.data_ptr<scalar_t>() + r0,
                              with_entropy ? ent_c.data_ptr<scalar_t>() + r0 : nullptr,
                              with_entropy ? ge_c.data_ptr<scalar_t>() + r0 : nullptr);
      auto d_hidden_chunk = d_hidden.narrow(0, r0, c);
      mm_blocked_k(d_hidden_chunk, dz, w_c);
      d_weight.addmm_(dz.t(), h_chunk);
    }
  });
  return {d_hidden.to(hidden.scalar_type()), d_weight.to(weight.scalar_type())};
}

}  // namespace pyvf
