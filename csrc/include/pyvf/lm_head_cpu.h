// CPU pieces shared by the two lm_head ops, token_logprobs (csrc/token_logprobs_cpu.cpp)
// and policy_loss (csrc/policy_loss_cpu.cpp): input checks, the per-row statistics
// (log-sum-exp, entropy) and dL/dz of a row of logits, the blocked GEMM of the
// gradient and the chunking of the rows. Both sources compile with -fno-trapping-math
// (CMakeLists.txt), which the row passes need to vectorize. Everything here has internal
// linkage (an unnamed namespace), so each source compiles its own copy with its own
// flags, as when the two ops were one file; the linker never picks one copy for both.
#pragma once

#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <exception>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace pyvf {
namespace lm_head_cpu {
namespace {

// Computation dtype: double stays double (gradcheck), everything else runs in fp32.
inline torch::ScalarType compute_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

inline void check_inputs(const torch::Tensor& hidden, const torch::Tensor& weight, const torch::Tensor& targets) {
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

// Rows are summed in blocks: SIMD lanes accumulate a block in T, blocks accumulate
// in double, so a 150k vocabulary keeps ~1e-7 relative accuracy in fp32.
constexpr int64_t kSumBlock = 2048;

// The row passes are inlined into each x86-64 level pyvf ships a clone for (AVX-512,
// AVX2+FMA, baseline), picked at load time: the wheel is built for baseline x86-64,
// while the exps of the row passes vectorize 2-4x wider on the CPUs it runs on.
// Each op's source defines its float row entry points with PYVF_ROW_CLONES.
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
// (policy_loss's fused pass reuses it as the unnormalized softmax).
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

// out = a @ b for a [c, K] chunk of dL/dz and b [K, H], K = the vocabulary. One fp32
// GEMM over K = 151936 accumulates along K in long runs (MKL: ~5e-5 relative error on
// d_hidden, measured); blocks of kGemmBlock columns with the partial products summed in
// double keep it near 2e-6 for a negligible c * H * K / kGemmBlock extra additions.
// (Smaller blocks are more accurate still, but many small GEMMs cost their own time.)
constexpr int64_t kGemmBlock = 8192;

inline void mm_blocked_k(torch::Tensor& out, const torch::Tensor& a, const torch::Tensor& b) {
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

// Fewest rows worth a thread of their own: below this a block's GEMMs are too thin to
// pay for waking another thread.
constexpr int64_t kMinRowsPerThread = 16;

// Runs fn(r0, r1) on one contiguous block of the rows [0, c) per thread, all in a single
// parallel region. Each ATen call outside such a region (a GEMM, a fill, an add) is a
// parallel region of its own that wakes the team and waits for its slowest thread; a
// chunk's logits GEMM, row pass and k-blocked d_hidden GEMM took about ten of them, and
// on a loaded 2-core machine each wait can be a scheduler time slice, which made the
// fixed per-call cost of small calls. Inside fn, ATen and MKL see the enclosing region
// and run single-threaded. The worker threads start with autograd's grad mode on, so
// fn's ATen calls run under a NoGradGuard (their inputs are detached by the callers).
// Subnormal floats flushed to zero (FTZ: results; DAZ: inputs) in this thread while in
// scope. A coefficient of 1e-35 (VeriFree's reward of a long reference) times the
// probabilities gives a subnormal dL/dz for almost every logit, and x86 takes a microcode
// assist for each one: a policy_loss call ran 66x slower (5.2 s instead of 0.08 s at
// N = 5000, V = 976). What is flushed is below 1.2e-38: it changes a gradient only where
// every coefficient of the step is that small, a gradient no optimizer step can see
// (AdamW's eps is 1e-8).
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

template <typename F>
void for_row_blocks(int64_t c, const F& fn) {
  const int64_t want = std::min<int64_t>(at::get_num_threads(), c / kMinRowsPerThread);
  const int nt = static_cast<int>(std::max<int64_t>(1, want));
  if (nt == 1) {
    FlushSubnormals flush;
    fn(int64_t{0}, c);
    return;
  }
  std::exception_ptr error;
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int64_t tid = 0, team = 1;
#endif
    const int64_t r0 = c * tid / team, r1 = c * (tid + 1) / team;
    try {
      at::NoGradGuard no_grad;
      FlushSubnormals flush;
      if (r1 > r0) fn(r0, r1);
    } catch (...) {
#pragma omp critical(pyvf_row_blocks_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

// Rows per chunk so that one [rows, v] buffer of elem-byte values fits in chunk_bytes.
inline int64_t chunk_rows(int64_t n, int64_t v, int64_t chunk_bytes, int64_t elem) {
  return std::max<int64_t>(1, std::min<int64_t>(n, chunk_bytes / std::max<int64_t>(1, v * elem)));
}

}  // namespace
}  // namespace lm_head_cpu
}  // namespace pyvf
