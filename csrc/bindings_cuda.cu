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

template <typename T>
const T* cptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

// A device workspace from the caching allocator, ordered on the current stream.
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte).memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor batch_stats_cuda_op(const at::Tensor& x, int64_t tiles) {
  constexpr const char* op = "fusedres_ext::batch_stats";
  const c10::cuda::CUDAGuard guard(x.device());
  auto p = prepare_batch_stats(op, x, tiles);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaSuccess;
  dispatch_storage<__half, __nv_bfloat16>(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    using S = typename decltype(tag)::S;
    const auto k = params_of<S>(p);
    auto work = workspace(batch_stats_cuda_workspace<T, S>(k), x);
    err = batch_stats_cuda<T, S>(cptr<T>(p.x), k, work.data_ptr(), stream);
  });
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return p.partials;
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cuda_op(const at::Tensor& dout, const at::Tensor& y,
                                                              const at::Tensor& mean, const at::Tensor& invstd,
                                                              const at::Tensor& scale, const at::Tensor& shift,
                                                              const std::optional<at::Tensor>& out, bool relu,
                                                              const std::optional<at::Tensor>& sample_scale) {
  constexpr const char* op = "fusedres_ext::bn_backward_reduce";
  const c10::cuda::CUDAGuard guard(y.device());
  auto p = prepare_bn_backward(op, dout, y, mean, invstd, scale, shift, out, relu, sample_scale);
  auto opts = y.options().dtype(stat_type(y.scalar_type())).memory_format(at::MemoryFormat::Contiguous);
  auto sum_g = at::empty({p.c}, opts), sum_gx = at::empty({p.c}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaSuccess;
  dispatch_storage<__half, __nv_bfloat16>(y.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    using S = typename decltype(tag)::S;
    auto k = params_of<S>(p, relu);
    k.sum_g = sum_g.data_ptr<S>();
    k.sum_gx = sum_gx.data_ptr<S>();
    auto work = workspace(bn_backward_reduce_cuda_workspace<T, S>(k), y);
    err = bn_backward_reduce_cuda<T, S>(cptr<T>(p.dout), cptr<T>(p.y), cptr<T>(p.out), k, work.data_ptr(), stream);
  });
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return {sum_g, sum_gx};
}

at::Tensor bn_backward_apply_cuda_op(const at::Tensor& dout, const at::Tensor& y, const at::Tensor& mean,
                                     const at::Tensor& invstd, const at::Tensor& scale, const at::Tensor& shift,
                                     const std::optional<at::Tensor>& out, bool relu,
                                     const std::optional<at::Tensor>& sample_scale, const at::Tensor& sum_g,
                                     const at::Tensor& sum_gx, const std::optional<at::Tensor>& addend,
                                     const std::optional<at::Tensor>& grad_out) {
  constexpr const char* op = "fusedres_ext::bn_backward_apply";
  const c10::cuda::CUDAGuard guard(y.device());
  auto p = prepare_bn_backward(op, dout, y, mean, invstd, scale, shift, out, relu, sample_scale);
  prepare_addend(op, p, addend, y);
  prepare_grad_out(op, p, grad_out, y);
  const auto sg = vec_arg(op, "sum_g", sum_g, p.c, y), sgx = vec_arg(op, "sum_gx", sum_gx, p.c, y);
  auto dy = at::empty(y.sizes(), y.options().memory_format(layout_of(y)));
  auto coefs = at::empty({3, p.c}, sg.options());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaSuccess;
  dispatch_storage<__half, __nv_bfloat16>(y.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    using S = typename decltype(tag)::S;
    auto k = params_of<S>(p, relu);
    err = bn_backward_coefs_cuda<S>(k, sg.data_ptr<S>(), sgx.data_ptr<S>(), coefs.data_ptr<S>(), stream);
    if (err != cudaSuccess) return;
    k.coefs = coefs.data_ptr<S>();
    T* gout = p.grad_out.defined() ? static_cast<T*>(p.grad_out.mutable_data_ptr()) : nullptr;
    err = bn_backward_apply_cuda<T, S>(cptr<T>(p.dout), cptr<T>(p.y), cptr<T>(p.out), cptr<T>(p.addend), gout,
                                       static_cast<T*>(dy.mutable_data_ptr()), k, stream);
  });
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return dy;
}

at::Tensor bn_apply_relu_cuda_op(const at::Tensor& dh, const at::Tensor& y, const at::Tensor& scale,
                                 const at::Tensor& shift, const at::Tensor& coefs) {
  constexpr const char* op = "fusedres_ext::bn_apply_relu";
  const c10::cuda::CUDAGuard guard(y.device());
  auto p = prepare_bn_apply_relu(op, dh, y, scale, shift, coefs);
  auto dy = at::empty(y.sizes(), y.options().memory_format(layout_of(y)));
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaSuccess;
  dispatch_storage<__half, __nv_bfloat16>(y.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    using S = typename decltype(tag)::S;
    err = bn_backward_apply_cuda<T, S>(cptr<T>(p.dout), cptr<T>(p.y), nullptr, nullptr, nullptr,
                                       static_cast<T*>(dy.mutable_data_ptr()), params_of<S>(p, true), stream);
  });
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return dy;
}

at::Tensor act_grad_cuda_op(const at::Tensor& dout, const at::Tensor& out) {
  constexpr const char* op = "fusedres_ext::act_grad";
  const c10::cuda::CUDAGuard guard(dout.device());
  auto p = prepare_act_grad(op, dout, out);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaSuccess;
  dispatch_storage<__half, __nv_bfloat16>(dout.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    err = act_grad_cuda<T>(cptr<T>(p.dout), cptr<T>(p.out), static_cast<T*>(p.dx.mutable_data_ptr()),
                           p.dx.numel(), stream);
  });
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
  return p.dx;
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres_ext, CUDA, m) {
  m.impl("bn_add_act", &fusedres::bn_add_act_cuda_op);
  m.impl("bn_finalize", &fusedres::bn_finalize_cuda_op);
  m.impl("batch_stats", &fusedres::batch_stats_cuda_op);
  m.impl("bn_backward_reduce", &fusedres::bn_backward_reduce_cuda_op);
  m.impl("bn_backward_apply", &fusedres::bn_backward_apply_cuda_op);
  m.impl("bn_apply_relu", &fusedres::bn_apply_relu_cuda_op);
  m.impl("act_grad", &fusedres::act_grad_cuda_op);
}
