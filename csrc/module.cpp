// pyvf._C: the native ops, dispatched on the device of their first tensor.
#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace pyvf {
namespace {

[[noreturn]] void no_cuda() {
  TORCH_CHECK(false, "pyvf._C was built without CUDA; see pyvf.build_info() and the README's build section");
}

torch::Tensor grouped_advantages(const torch::Tensor& rewards, int64_t group_size,
                                 const std::optional<torch::Tensor>& offsets,
                                 const std::optional<torch::Tensor>& order, int64_t estimator, double eps) {
  if (rewards.is_cuda()) {
#ifdef PYVF_WITH_CUDA
    return grouped_advantages_cuda(rewards, group_size, offsets, order, estimator, eps);
#else
    no_cuda();
#endif
  }
  return grouped_advantages_cpu(rewards, group_size, offsets, order, estimator, eps);
}

torch::Tensor segment_sum(const torch::Tensor& values, const torch::Tensor& cu_seqlens,
                          const std::optional<torch::Tensor>& mask) {
  if (values.is_cuda()) {
#ifdef PYVF_WITH_CUDA
    return segment_sum_cuda(values, cu_seqlens, mask);
#else
    no_cuda();
#endif
  }
  return segment_sum_cpu(values, cu_seqlens, mask);
}

// Sets (or clears) flush-to-zero and denormals-are-zero in the calling thread and in
// every thread of the OpenMP team ATen's and MKL's CPU kernels run on (the team's
// threads persist, and keep the mode). Returns how many threads were set.
int flush_subnormals(bool on) {
  int threads = 1;
#if defined(__x86_64__) || defined(_M_X64)
  const auto set = [on] {
    const unsigned int bits = 0x8040u;  // FTZ (bit 15) | DAZ (bit 6)
    _mm_setcsr(on ? (_mm_getcsr() | bits) : (_mm_getcsr() & ~bits));
  };
  set();
#ifdef _OPENMP
  const int team = at::get_num_threads();
#pragma omp parallel num_threads(team)
  {
    set();
#pragma omp single
    threads = omp_get_num_threads();
  }
#endif
#else
  (void)on;
  threads = 0;
#endif
  return threads;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef PYVF_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = PYVF_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
  info["torch"] = PYVF_TORCH_VERSION;
  return info;
}

}  // namespace
}  // namespace pyvf

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyvf native ops (CPU, and CUDA when built with it)";
  m.def("grouped_advantages", &pyvf::grouped_advantages, "per-group advantages", pybind11::arg("rewards"),
        pybind11::arg("group_size"), pybind11::arg("offsets"), pybind11::arg("order"), pybind11::arg("estimator"),
        pybind11::arg("eps"));
  m.def("segment_sum", &pyvf::segment_sum, "per-segment sums", pybind11::arg("values"),
        pybind11::arg("cu_seqlens"), pybind11::arg("mask"));
  m.def("token_logprobs_forward_cpu", &pyvf::token_logprobs_forward_cpu, "token_logprobs forward (CPU)",
        pybind11::arg("hidden"), pybind11::arg("weight"), pybind11::arg("targets"), pybind11::arg("inv_temp"),
        pybind11::arg("with_entropy"), pybind11::arg("chunk_bytes"));
  m.def("token_logprobs_backward_cpu", &pyvf::token_logprobs_backward_cpu, "token_logprobs backward (CPU)",
        pybind11::arg("hidden"), pybind11::arg("weight"), pybind11::arg("targets"), pybind11::arg("lse"),
        pybind11::arg("entropy"), pybind11::arg("grad_logp"), pybind11::arg("grad_entropy"),
        pybind11::arg("inv_temp"), pybind11::arg("chunk_bytes"));
  m.def("policy_loss_cpu", &pyvf::policy_loss_cpu, "policy_loss values and gradients in one pass (CPU)",
        pybind11::arg("hidden"), pybind11::arg("weight"), pybind11::arg("targets"), pybind11::arg("coeffs"),
        pybind11::arg("entropy_coeffs"), pybind11::arg("inv_temp"), pybind11::arg("need_d_hidden"),
        pybind11::arg("need_d_weight"), pybind11::arg("chunk_bytes"));
  m.def("build_info", &pyvf::build_info, "backends compiled into this module");
  m.def("flush_subnormals", &pyvf::flush_subnormals, "flush-to-zero and denormals-are-zero in the CPU threads",
        pybind11::arg("on"));
}
