// CUDA implementations of the fusedres_ext:: ops: validate, take the current stream, launch.
// No host synchronisation, so the ops are safe inside CUDA graphs.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "bindings.h"
#include "kernels/bn_cuda.cuh"

namespace fusedres {
namespace {

at::Tensor bn_add_act_cuda_op(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                              const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& res_scale,
                              const std::optional<at::Tensor>& res_shift,
                              const std::optional<at::Tensor>& sample_scale, bool relu) {
  constexpr const char* op = "fusedres_ext::bn_add_act";
  const c10::cuda::CUDAGuard guard(y.device());
  auto p = prepare_bn_add_act(op, y, scale, shift, residual, res_scale, res_shift, sample_scale);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaSuccess;
  const bool has_r = p.residual.defined();
  switch (y.scalar_type()) {
    case at::kFloat:
      err = bn_add_act_cuda<float, float>(p.y.data_ptr<float>(), has_r ? p.residual.data_ptr<float>() : nullptr,
                                          p.out.data_ptr<float>(), params_of<float>(p, relu), stream);
      break;
    case at::kDouble:
      err = bn_add_act_cuda<double, double>(p.y.data_ptr<double>(), has_r ? p.residual.data_ptr<double>() : nullptr,
                                            p.out.data_ptr<double>(), params_of<double>(p, relu), stream);
      break;
    case at::kHalf:
      err = bn_add_act_cuda<__half, float>(
          reinterpret_cast<const __half*>(p.y.data_ptr()),
          has_r ? reinterpret_cast<const __half*>(p.residual.data_ptr()) : nullptr,
          reinterpret_cast<__half*>(p.out.data_ptr()), params_of<float>(p, relu), stream);
      break;
    case at::kBFloat16:
      err = bn_add_act_cuda<__nv_bfloat16, float>(
          reinterpret_cast<const __nv_bfloat16*>(p.y.data_ptr()),
          has_r ? reinterpret_cast<const __nv_bfloat16*>(p.residual.data_ptr()) : nullptr,
          reinterpret_cast<__nv_bfloat16*>(p.out.data_ptr()), params_of<float>(p, relu), stream);
      break;
    default:
      TORCH_CHECK(false, op, ": y must be float32, float64, float16 or bfloat16, got ", y.scalar_type());
  }
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return p.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_cuda_op(
    const at::Tensor& partials, const at::Tensor& gamma, const at::Tensor& beta,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps) {
  constexpr const char* op = "fusedres_ext::bn_finalize";
  const c10::cuda::CUDAGuard guard(partials.device());
  auto p = prepare_bn_finalize(op, partials, gamma, beta, running_mean, running_var);
  // The per-channel counts live on the device: checking n > 1 for the running statistics
  // here would need a host sync, so callers check it from the input shape beforehand
  // (as nn.BatchNorm2d does); the CPU op checks the partials themselves.
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = p.partials.scalar_type() == at::kDouble
                        ? bn_finalize_cuda<double>(params_of<double>(p, momentum, eps), stream)
                        : bn_finalize_cuda<float>(params_of<float>(p, momentum, eps), stream);
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  write_back_running(p, running_mean, running_var);
  return {p.mean, p.invstd, p.scale, p.shift};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres_ext, CUDA, m) {
  m.impl("bn_add_act", &fusedres::bn_add_act_cuda_op);
  m.impl("bn_finalize", &fusedres::bn_finalize_cuda_op);
}
