// CPU paths of token_logprobs and policy_loss: token chunks, one GEMM per chunk into
// a [chunk, V] buffer, then a fused pass per row (OpenMP) for log-sum-exp, the target
// logit and the entropy. token_logprobs' backward recomputes each chunk's logits and
// turns them into dL/dz in place before two GEMMs (8NHV in all); policy_loss knows
// its coefficients up front, so the same row pass writes dL/dz right after the
// statistics and the two GEMMs follow without a recompute (6NHV). Extra memory:
// O(N + chunk * V) plus, for half-precision inputs, fp32 copies of the weight and its
// gradient.
#include "ops.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

namespace pyvf {
namespace {

// Computation dtype: double stays double (gradcheck), everything else runs in fp32.
torch::ScalarType compute_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

void check_inputs(const torch::Tensor& hidden, const torch::Tensor& weight, const torch::Tensor& targets) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden [N, H] and weight [V, H] must share H");
  TORCH_CHECK(targets.scalar_type() == torch::kLong && targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "targets must be int64 [N]");
  TORCH_CHECK(weight.size(0) >= 1, "weight must have at least one row");
}

// exp for arguments <= 0 (every call here exponentiates z - max or z - lse), in a
// form the compiler vectorizes: Cody-Waite reduction to r in [-ln2/2, ln2/2], the
// Cephes degree-6 polynomial, then scaling by 2^n through the exponent bits.
// Relative error ~1e-7; arguments below -87 return ~1e-38 instead of underflowing,
// which changes sums of at least 1 by nothing representable.
inline float vexp(float x) {
  x = std::max(x, -87.0f);
  // Round to nearest by the 1.5 * 2^23 trick: SSE2 has no vector floor.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline double vexp(double x) { return std::exp(x); }

#define PYVF_ROW_INLINE inline __attribute__((always_inline))

// Rows are summed in blocks: SIMD lanes accumulate a block in T, blocks accumulate
// in double, so a 150k vocabulary keeps ~1e-7 relative accuracy in fp32.
constexpr int64_t kSumBlock = 2048;

// The row passes are inlined into each x86-64 level pyvf ships a clone for (AVX-512,
// AVX2+FMA, baseline), picked at load time: the wheel is built for baseline x86-64,
// while the exps of the row passes vectorize 2-4x wider on the CPUs it runs on.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones) && !defined(__clang__)
#define PYVF_ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef PYVF_ROW_CLONES
#define PYVF_ROW_CLONES
#endif
#define PYVF_ROW_INLINE inline __attribute__((always_inline))

// Per-row statistics of one row of scaled logits z = logits * inv_temp.
template <typename T>
struct RowStats {
  T lse;
  T entropy;
  T max;
  double sum;  // sum_j exp(z_j - max)
};

// lse and entropy of a row. With store_exp, exp(z - max) overwrites the row on the way
// (the fused pass reuses it as the unnormalized softmax).
template <typename T>
PYVF_ROW_INLINE RowStats<T> row_stats(T* logits, int64_t v, T inv_temp, bool with_entropy, bool store_exp) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; ++j) m = std::max(m, logits[j] * inv_temp);
  double s = 0, t = 0;
  for (int64_t b0 = 0; b0 < v; b0 += kSumBlock) {
    const int64_t b1 = std::min(v, b0 + kSumBlock);
    T sb = 0, tb = 0;
    if (store_exp) {
#pragma omp simd reduction(+ : sb, tb)
      for (int64_t j = b0; j < b1; ++j) {
        const T d = logits[j] * inv_temp - m;
        const T e = vexp(d);
        sb += e;
        tb += e * d;
        logits[j] = e;
      }
    } else if (with_entropy) {
#pragma omp simd reduction(+ : sb, tb)
      for (int64_t j = b0; j < b1; ++j) {
        const T d = logits[j] * inv_temp - m;
        const T e = vexp(d);
        sb += e;
        tb += e * d;
      }
    } else {
#pragma omp simd reduction(+ : sb)
      for (int64_t j = b0; j < b1; ++j) sb += vexp(logits[j] * inv_temp - m);
    }
    s += sb;
    t += tb;
  }
  RowStats<T> out;
  out.lse = static_cast<T>(m + std::log(s));
  // Relative to the max: log(s) - t / s avoids lse - sum(p z) cancelling at low entropy.
  out.entropy = with_entropy || store_exp ? static_cast<T>(std::log(s) - t / s) : T(0);
  out.max = m;
  out.sum = s;
  return out;
}

// token_logprobs' forward row: log-prob of the target, lse, entropy (when asked).
template <typename T>
PYVF_ROW_INLINE void forward_row_impl(T* row, int64_t v, T inv_temp, int64_t target, T* logp, T* lse, T* entropy) {
  const RowStats<T> st = row_stats(row, v, inv_temp, entropy != nullptr, false);
  *lse = st.lse;
  *logp = row[target] * inv_temp - st.lse;
  if (entropy) *entropy = st.entropy;
}

// One row of logits -> dL/dz in place, given its lse (and entropy):
// g (1[j = t] - p) - e p (z - lse + H), times 1 / temperature.
template <typename T>
PYVF_ROW_INLINE void grad_row_impl(T* row, int64_t v, T inv_temp, int64_t target, T g, T lse, T entropy,
                                   const T* grad_entropy) {
  if (grad_entropy) {
    const T ge = *grad_entropy;
    const T shift = entropy - lse;
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) {
      const T z = row[j] * inv_temp;
      const T p = vexp(z - lse);
      row[j] = (-g * p - ge * p * (z + shift)) * inv_temp;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) row[j] = -g * vexp(row[j] * inv_temp - lse) * inv_temp;
  }
  row[target] += g * inv_temp;
}

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

// Entry points per row: the float ones are cloned per x86-64 level (PYVF_ROW_CLONES above).

PYVF_ROW_CLONES void forward_row_f32(float* row, int64_t v, float inv_temp, int64_t target, float* logp, float* lse,
                                     float* entropy) {
  forward_row_impl(row, v, inv_temp, target, logp, lse, entropy);
}
PYVF_ROW_CLONES void grad_row_f32(float* row, int64_t v, float inv_temp, int64_t target, float g, float lse,
                                  float entropy, const float* grad_entropy) {
  grad_row_impl(row, v, inv_temp, target, g, lse, entropy, grad_entropy);
}
PYVF_ROW_CLONES void policy_row_f32(float* row, int64_t v, float inv_temp, int64_t target, float c, const float* ec,
                                    bool need_grad, float* logp, float* lse, float* entropy) {
  policy_row_impl(row, v, inv_temp, target, c, ec, need_grad, logp, lse, entropy);
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
template <typename T>
void policy_row(T* row, int64_t v, T inv_temp, int64_t target, T c, const T* ec, bool need_grad, T* logp, T* lse,
                T* entropy) {
  if constexpr (std::is_same_v<T, float>) {
    policy_row_f32(row, v, inv_temp, target, c, ec, need_grad, logp, lse, entropy);
  } else {
    policy_row_impl(row, v, inv_temp, target, c, ec, need_grad, logp, lse, entropy);
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

// policy_loss's rows: statistics and, when need_grad, dL/dz in place.
template <typename T>
void policy_rows(T* logits, int64_t c, int64_t v, T inv_temp, const int64_t* targets, const T* coeffs,
                 const T* entropy_coeffs, bool need_grad, T* logp, T* lse, T* entropy) {
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < c; ++i)
    policy_row(logits + i * v, v, inv_temp, targets[i], coeffs[i], entropy_coeffs ? entropy_coeffs + i : nullptr,
               need_grad, logp + i, lse + i, entropy + i);
}

// out = a @ b for a [c, K] chunk of dL/dz and b [K, H], K = the vocabulary. One fp32
// GEMM over K = 151936 accumulates along K in long runs (MKL: ~5e-5 relative error on
// d_hidden, measured); blocks of kGemmBlock columns with the partial products summed in
// double keep it near 2e-6 for a negligible c * H * K / kGemmBlock extra additions.
// (Smaller blocks are more accurate still, but many small GEMMs cost their own time.)
constexpr int64_t kGemmBlock = 8192;

void mm_blocked_k(torch::Tensor& out, const torch::Tensor& a, const torch::Tensor& b) {
  const int64_t k = a.size(1);
  if (k <= kGemmBlock || a.scalar_type() == torch::kDouble) {
    at::mm_out(out, a, b);
    return;
  }
  auto acc = torch::zeros(out.sizes(), out.options().dtype(torch::kDouble));
  auto part = torch::empty_like(out);
  for (int64_t k0 = 0; k0 < k; k0 += kGemmBlock) {
    const int64_t kb = std::min(kGemmBlock, k - k0);
    at::mm_out(part, a.narrow(1, k0, kb), b.narrow(0, k0, kb));
    acc.add_(part);
  }
  out.copy_(acc);
}

int64_t chunk_rows(int64_t n, int64_t v, int64_t chunk_bytes, int64_t elem) {
  return std::max<int64_t>(1, std::min<int64_t>(n, chunk_bytes / std::max<int64_t>(1, v * elem)));
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
  const auto h_c = hidden.to(ct).contiguous();
  const auto w_c = weight.to(ct).contiguous();
  const auto tgt = targets.contiguous();
  const auto c_c = coeffs.to(ct).contiguous();
  const auto e_c = with_entropy_grad ? entropy_coeffs->to(ct).contiguous() : torch::Tensor();
  auto opts = hidden.options().dtype(ct);
  auto logp = torch::empty({n}, opts), lse = torch::empty({n}, opts), entropy = torch::empty({n}, opts);
  auto d_hidden = need_d_hidden ? torch::empty({n, hidden.size(1)}, opts) : torch::Tensor();
  auto d_weight = need_d_weight ? torch::zeros({v, hidden.size(1)}, opts) : torch::Tensor();
  const int64_t rows = chunk_rows(n, v, chunk_bytes, c10::elementSize(ct));
  auto buffer = torch::empty({rows, v}, opts);

  AT_DISPATCH_FLOATING_TYPES(ct, "policy_loss_cpu", [&] {
    const scalar_t it = static_cast<scalar_t>(inv_temp);
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t c = std::min(rows, n - r0);
      auto logits = buffer.narrow(0, 0, c);
      const auto h_chunk = h_c.narrow(0, r0, c);
      at::mm_out(logits, h_chunk, w_c.t());
      scalar_t* z = logits.data_ptr<scalar_t>();
      const int64_t* t = tgt.data_ptr<int64_t>() + r0;
      policy_rows<scalar_t>(z, c, v, it, t, c_c.data_ptr<scalar_t>() + r0,
                            with_entropy_grad ? e_c.data_ptr<scalar_t>() + r0 : nullptr, need_grad,
                            logp.data_ptr<scalar_t>() + r0, lse.data_ptr<scalar_t>() + r0,
                            entropy.data_ptr<scalar_t>() + r0);
      if (!need_grad) continue;
      if (need_d_hidden) {
        auto d_hidden_chunk = d_hidden.narrow(0, r0, c);
        mm_blocked_k(d_hidden_chunk, logits, w_c);
      }
      if (need_d_weight) d_weight.addmm_(logits.t(), h_chunk);
    }
  });
  return {logp, entropy, need_d_hidden ? d_hidden.to(hidden.scalar_type()) : torch::Tensor(),
          need_d_weight ? d_weight.to(weight.scalar_type()) : torch::Tensor()};
}

}  // namespace pyvf
