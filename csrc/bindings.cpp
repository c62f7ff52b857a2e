// fusedres._C: registers the fusedres_ext:: ops (schemas + CPU kernels). CUDA kernels are
// registered from bindings_cuda.cu when the extension is built with CUDA.
#include <Python.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <torch/library.h>

#include "bindings.h"
#include "kernels/bn_cpu.h"

namespace fusedres {
namespace {

template <typename T, typename S>
void launch_bn_add_act_cpu(const BnAddActPrepared& p, bool relu) {
  const auto k = params_of<S>(p, relu);
  const T* y = static_cast<const T*>(p.y.const_data_ptr());
  const T* r = p.residual.defined() ? static_cast<const T*>(p.residual.const_data_ptr()) : nullptr;
  T* out = static_cast<T*>(p.out.mutable_data_ptr());
  const int64_t rows = bn_add_act_rows(p.n, p.c, p.hw, p.layout);
  const int64_t row_len = std::max<int64_t>(1, bn_add_act_row_length(p.c, p.hw, p.layout));
  const int64_t grain = std::max<int64_t>(1, 32768 / row_len);
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { bn_add_act_cpu<T, S>(y, r, out, k, b, e); });
}

at::Tensor bn_add_act_cpu_op(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                             const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& res_scale,
                             const std::optional<at::Tensor>& res_shift,
                             const std::optional<at::Tensor>& sample_scale, bool relu) {
  constexpr const char* op = "fusedres_ext::bn_add_act";
  const auto dt = y.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": y must be float32, float64, float16 or bfloat16, got ", dt);
  auto p = prepare_bn_add_act(op, y, scale, shift, residual, res_scale, res_shift, sample_scale);
  switch (dt) {
    case at::kFloat:
      launch_bn_add_act_cpu<float, float>(p, relu);
      break;
    case at::kDouble:
      launch_bn_add_act_cpu<double, double>(p, relu);
      break;
    case at::kHalf:
      static_assert(sizeof(at::Half) == sizeof(Half), "at::Half and fusedres::Half share a layout");
      launch_bn_add_act_cpu<Half, float>(p, relu);
      break;
    default:
      static_assert(sizeof(at::BFloat16) == sizeof(BFloat16), "at::BFloat16 and fusedres::BFloat16 share a layout");
      launch_bn_add_act_cpu<BFloat16, float>(p, relu);
      break;
  }
  return p.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_finalize_cpu_op(
    const at::Tensor& partials, const at::Tensor& gamma, const at::Tensor& beta,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double momentum,
    double eps) {
  constexpr const char* op = "fusedres_ext::bn_finalize";
  auto p = prepare_bn_finalize(op, partials, gamma, beta, running_mean, running_var);
  AT_DISPATCH_FLOATING_TYPES(p.partials.scalar_type(), "bn_finalize_cpu", [&] {
    if (running_mean.has_value() && p.c > 0) {
      const double n = partials_min_count_cpu<scalar_t>(p.partials.const_data_ptr<scalar_t>(), p.tiles, p.c);
      TORCH_CHECK(n > 1, op, ": expected more than 1 value per channel to update running_mean/running_var "
                  "(the unbiased variance divides by n - 1), got n = ", n);
    }
    const auto k = params_of<scalar_t>(p, momentum, eps);
    at::parallel_for(0, p.c, 64, [&](int64_t b, int64_t e) { bn_finalize_cpu<scalar_t>(k, b, e); });
  });
  write_back_running(p, running_mean, running_var);
  return {p.mean, p.invstd, p.scale, p.shift};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY(fusedres_ext, m) {
  m.def(
      "bn_add_act(Tensor y, Tensor scale, Tensor shift, Tensor? residual, Tensor? res_scale, Tensor? res_shift, "
      "Tensor? sample_scale, bool relu) -> Tensor");
  m.def(
      "bn_finalize(Tensor partials, Tensor gamma, Tensor beta, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedres_ext, CPU, m) {
  m.impl("bn_add_act", &fusedres::bn_add_act_cpu_op);
  m.impl("bn_finalize", &fusedres::bn_finalize_cpu_op);
}

// ------------------------------------------------------------------ Python module

static PyObject* build_info(PyObject*, PyObject*) {
#ifdef FUSEDRES_WITH_CUDA
  return PyUnicode_FromString("cpu+cuda");
#else
  return PyUnicode_FromString("cpu");
#endif
}

static PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS, "'cpu' or 'cpu+cuda': the kernels compiled into this extension."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "fusedres C++/CUDA kernels (registers fusedres_ext ops)",
                              -1, kMethods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
