// fusedres._C: registers the fusedres_ext:: ops (schemas + CPU kernels). CUDA kernels are
// registered from bindings_cuda.cu when the extension is built with CUDA.
#include <Python.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <torch/library.h>

#include "bindings.h"
#include "kernels/bn_cpu.h"
#include "kernels/fold_cpu.h"
#include "kernels/pool_cpu.h"

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

template <typename T>
const T* cptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

at::Tensor batch_stats_cpu_op(const at::Tensor& x, int64_t tiles) {
  constexpr const char* op = "fusedres_ext::batch_stats";
  auto p = prepare_batch_stats(op, x, tiles);
  if (p.c == 0) return p.partials;
  const auto g = batch_stats_geom_cpu(p.n, p.c, p.hw, p.layout, p.tiles);
  auto work = at::empty({g.work}, at::kDouble);
  double* w = work.data_ptr<double>();
  dispatch_storage<Half, BFloat16>(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    using S = typename decltype(tag)::S;
    const auto k = params_of<S>(p);
    const T* xp = cptr<T>(p.x);
    // one block of rows per item; the merge reads every block of a channel in a fixed order
    at::parallel_for(0, g.items, 1, [&](int64_t b, int64_t e) { batch_stats_blocks_cpu<T, S>(xp, k, w, b, e); });
    at::parallel_for(0, p.c, 16, [&](int64_t b, int64_t e) { batch_stats_merge_cpu<S>(k, w, b, e); });
  });
  return p.partials;
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu_op(const at::Tensor& dout, const at::Tensor& y,
                                                             const at::Tensor& mean, const at::Tensor& invstd,
                                                             const at::Tensor& scale, const at::Tensor& shift,
                                                             const std::optional<at::Tensor>& out, bool relu,
                                                             const std::optional<at::Tensor>& sample_scale) {
  constexpr const char* op = "fusedres_ext::bn_backward_reduce";
  auto p = prepare_bn_backward(op, dout, y, mean, invstd, scale, shift, out, relu, sample_scale);
  auto opts = y.options().dtype(stat_type(y.scalar_type())).memory_format(at::MemoryFormat::Contiguous);
  auto sum_g = at::empty({p.c}, opts), sum_gx = at::empty({p.c}, opts);
  if (p.c == 0) return {sum_g, sum_gx};
  const auto g = bn_backward_reduce_geom_cpu(p.n, p.c, p.hw, p.layout);
  auto work = at::empty({g.work}, at::kDouble);
  double* w = work.data_ptr<double>();
  dispatch_storage<Half, BFloat16>(y.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    using S = typename decltype(tag)::S;
    auto k = params_of<S>(p, relu);
    k.sum_g = sum_g.data_ptr<S>();
    k.sum_gx = sum_gx.data_ptr<S>();
    const T *d = cptr<T>(p.dout), *yp = cptr<T>(p.y), *o = cptr<T>(p.out);
    at::parallel_for(0, g.items, 1,
                     [&](int64_t b, int64_t e) { bn_backward_reduce_blocks_cpu<T, S>(d, yp, o, k, w, b, e); });
    at::parallel_for(0, p.c, 16, [&](int64_t b, int64_t e) { bn_backward_reduce_merge_cpu<S>(k, w, b, e); });
  });
  return {sum_g, sum_gx};
}

// dy = A*g + B*y + C (+ addend) over the prepared operands (k.coefs set), in y's layout.
template <typename T, typename S>
at::Tensor bn_apply_cpu(const BnBackwardPrepared& p, const BnBackwardParams<S>& k) {
  auto dy = at::empty(p.y.sizes(), p.y.options().memory_format(layout_of(p.y)));
  const T *d = cptr<T>(p.dout), *yp = cptr<T>(p.y), *o = cptr<T>(p.out), *ad = cptr<T>(p.addend);
  T* res = static_cast<T*>(dy.mutable_data_ptr());
  T* gout = p.grad_out.defined() ? static_cast<T*>(p.grad_out.mutable_data_ptr()) : nullptr;
  const int64_t rows = bn_add_act_rows(p.n, p.c, p.hw, p.layout);
  const int64_t row_len = std::max<int64_t>(1, bn_add_act_row_length(p.c, p.hw, p.layout));
  const int64_t grain = std::max<int64_t>(1, 32768 / row_len);
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { bn_backward_apply_cpu<T, S>(d, yp, o, ad, gout, res, k, b, e); });
  return dy;
}

at::Tensor bn_backward_apply_cpu_op(const at::Tensor& dout, const at::Tensor& y, const at::Tensor& mean,
                                    const at::Tensor& invstd, const at::Tensor& scale, const at::Tensor& shift,
                                    const std::optional<at::Tensor>& out, bool relu,
                                    const std::optional<at::Tensor>& sample_scale, const at::Tensor& sum_g,
                                    const at::Tensor& sum_gx, const std::optional<at::Tensor>& addend,
                                    const std::optional<at::Tensor>& grad_out) {
  constexpr const char* op = "fusedres_ext::bn_backward_apply";
  auto p = prepare_bn_backward(op, dout, y, mean, invstd, scale, shift, out, relu, sample_scale);
  prepare_addend(op, p, addend, y);
  prepare_grad_out(op, p, grad_out, y);
  const auto sg = vec_arg(op, "sum_g", sum_g, p.c, y), sgx = vec_arg(op, "sum_gx", sum_gx, p.c, y);
  auto coefs = at::empty({3, p.c}, sg.options());
  at::Tensor dy;
  dispatch_storage<Half, BFloat16>(y.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    using S = typename decltype(tag)::S;
    auto k = params_of<S>(p, relu);
    bn_backward_coefs_cpu<S>(k, sg.data_ptr<S>(), sgx.data_ptr<S>(), coefs.data_ptr<S>());
    k.coefs = coefs.data_ptr<S>();
    dy = bn_apply_cpu<T, S>(p, k);
  });
  return dy;
}

at::Tensor bn_apply_relu_cpu_op(const at::Tensor& dh, const at::Tensor& y, const at::Tensor& scale,
                                const at::Tensor& shift, const at::Tensor& coefs) {
  auto p = prepare_bn_apply_relu("fusedres_ext::bn_apply_relu", dh, y, scale, shift, coefs);
  at::Tensor dy;
  dispatch_storage<Half, BFloat16>(y.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    using S = typename decltype(tag)::S;
    dy = bn_apply_cpu<T, S>(p, params_of<S>(p, true));
  });
  return dy;
}

at::Tensor act_grad_cpu_op(const at::Tensor& dout, const at::Tensor& out) {
  constexpr const char* op = "fusedres_ext::act_grad";
  auto p = prepare_act_grad(op, dout, out);
  dispatch_storage<Half, BFloat16>(dout.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    const T *d = cptr<T>(p.dout), *o = cptr<T>(p.out);
    T* dx = static_cast<T*>(p.dx.mutable_data_ptr());
    at::parallel_for(0, p.dx.numel(), 32768, [&](int64_t b, int64_t e) { act_grad_cpu<T>(d, o, dx, b, e); });
  });
  return p.dx;
}

// In place; a tensor whose elements are not one dense block of its storage (a strided view)
// goes through at::relu_, which gives the same result.
void relu_cpu_op(at::Tensor& x) {
  constexpr const char* op = "fusedres_ext::relu_";
  check_storage(op, "x", x);
  if (!x.is_non_overlapping_and_dense()) {
    x.relu_();
    return;
  }
  dispatch_storage<Half, BFloat16>(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    T* d = static_cast<T*>(x.mutable_data_ptr());
    at::parallel_for(0, x.numel(), 65536, [&](int64_t b, int64_t e) { relu_inplace_cpu<T>(d, b, e); });
  });
}

// max_pool2d (dilation 1, floor mode) of a channels_last-contiguous input, optionally of
// relu(input); no indices. The output is channels_last.
at::Tensor max_pool2d_cpu_op(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, bool relu) {
  constexpr const char* op = "fusedres_ext::max_pool2d";
  FUSEDRES_CHECK_ARG(x.dim() == 4, op, "x", "must be 4-D (N, C, H, W), got shape ", x.sizes());
  check_storage(op, "x", x);
  FUSEDRES_CHECK_ARG(x.is_contiguous(at::MemoryFormat::ChannelsLast), op, "x",
                     "must be channels_last-contiguous, got strides ", x.strides());
  FUSEDRES_CHECK_ARG(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op, "kernel_size",
                     "stride and padding must have two elements each");
  MaxPoolParams p;
  p.n = x.size(0);
  p.c = x.size(1);
  p.h = x.size(2);
  p.w = x.size(3);
  p.kh = kernel_size[0];
  p.kw = kernel_size[1];
  p.sh = stride[0];
  p.sw = stride[1];
  p.ph = padding[0];
  p.pw = padding[1];
  p.relu = relu;
  FUSEDRES_CHECK_ARG(p.kh > 0 && p.kw > 0, op, "kernel_size", "must be positive, got ", kernel_size);
  FUSEDRES_CHECK_ARG(p.sh > 0 && p.sw > 0, op, "stride", "must be positive, got ", stride);
  FUSEDRES_CHECK_ARG(p.ph >= 0 && p.pw >= 0 && 2 * p.ph <= p.kh && 2 * p.pw <= p.kw, op, "padding",
                     "must be between 0 and half the kernel size, got ", padding, " for kernel_size ", kernel_size);
  p.p = (p.h + 2 * p.ph - p.kh) / p.sh + 1;
  p.q = (p.w + 2 * p.pw - p.kw) / p.sw + 1;
  FUSEDRES_CHECK_ARG(p.p > 0 && p.q > 0, op, "x", "is too small for the window: input ", x.sizes(),
                     ", kernel_size ", kernel_size, ", padding ", padding);
  at::Tensor y = at::empty({p.n, p.c, p.p, p.q}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  dispatch_storage<Half, BFloat16>(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::T;
    const T* src = static_cast<const T*>(x.const_data_ptr());
    T* dst = static_cast<T*>(y.mutable_data_ptr());
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.q * p.c));
    at::parallel_for(0, p.n * p.p, grain, [&](int64_t b, int64_t e) { max_pool_nhwc_cpu<T>(src, dst, p, b, e); });
  });
  return y;
}

// weight * scale per output channel (dim 0), multiplied in float32 and stored as `dtype`: the
// BatchNorm fold of a convolution weight in one pass. weight: float32/float16/bfloat16, dense
// with dim 0 outermost (contiguous or channels_last); scale: float32 [weight.size(0)]. The
// output has weight's strides.
at::Tensor fold_scale_cpu_op(const at::Tensor& weight, const at::Tensor& scale, at::ScalarType dtype) {
  constexpr const char* op = "fusedres_ext::fold_scale";
  const auto in_t = weight.scalar_type();
  FUSEDRES_CHECK_ARG(in_t == at::kFloat || in_t == at::kHalf || in_t == at::kBFloat16, op, "weight",
                     "must be float32, float16 or bfloat16, got ", in_t);
  FUSEDRES_CHECK_ARG(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, "dtype",
                     "must be float32, float16 or bfloat16, got ", dtype);
  FUSEDRES_CHECK_ARG(weight.dim() >= 1 && weight.size(0) > 0, op, "weight",
                     "must have at least one dimension and one output channel, got shape ", weight.sizes());
  const int64_t k = weight.size(0);
  const int64_t block = weight.numel() / k;
  const bool dense = weight.is_contiguous() ||
                     (weight.dim() == 4 && weight.is_contiguous(at::MemoryFormat::ChannelsLast));
  FUSEDRES_CHECK_ARG(dense && (k == 1 || block == 0 || weight.stride(0) == block), op, "weight",
                     "must be contiguous or channels_last-contiguous with dim 0 outermost, got strides ",
                     weight.strides());
  FUSEDRES_CHECK_ARG(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == k &&
                         scale.is_contiguous(),
                     op, "scale", "must be a contiguous float32 vector of ", k, " elements, got ", scale.scalar_type(),
                     " of shape ", scale.sizes());
  at::Tensor out = at::empty_like(weight, weight.options().dtype(dtype), at::MemoryFormat::Preserve);
  if (block == 0) return out;
  const float* s = scale.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / block);
  auto run = [&](auto in_tag, auto out_tag) {
    using In = decltype(in_tag);
    using Out = decltype(out_tag);
    const In* w = static_cast<const In*>(weight.const_data_ptr());
    Out* o = static_cast<Out*>(out.mutable_data_ptr());
    at::parallel_for(0, k, grain, [&](int64_t b, int64_t e) { fold_scale_cpu<In, Out>(w, s, o, block, b, e); });
  };
  auto with_out = [&](auto in_tag) {
    if (dtype == at::kFloat) {
      run(in_tag, float{});
    } else if (dtype == at::kHalf) {
      run(in_tag, Half{});
    } else {
      run(in_tag, BFloat16{});
    }
  };
  if (in_t == at::kFloat) {
    with_out(float{});
  } else if (in_t == at::kHalf) {
    with_out(Half{});
  } else {
    with_out(BFloat16{});
  }
  return out;
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
  m.def("batch_stats(Tensor x, int tiles) -> Tensor");
  m.def(
      "bn_backward_reduce(Tensor dout, Tensor y, Tensor mean, Tensor invstd, Tensor scale, Tensor shift, "
      "Tensor? out, bool relu, Tensor? sample_scale) -> (Tensor, Tensor)");
  m.def(
      "bn_backward_apply(Tensor dout, Tensor y, Tensor mean, Tensor invstd, Tensor scale, Tensor shift, "
      "Tensor? out, bool relu, Tensor? sample_scale, Tensor sum_g, Tensor sum_gx, Tensor? addend=None, "
      "Tensor(a!)? grad_out=None) -> Tensor");
  m.def("bn_apply_relu(Tensor dh, Tensor y, Tensor scale, Tensor shift, Tensor coefs) -> Tensor");
  m.def("act_grad(Tensor dout, Tensor out) -> Tensor");
  m.def("relu_(Tensor(a!) x) -> ()");
  m.def("max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool relu) -> Tensor");
  m.def("fold_scale(Tensor weight, Tensor scale, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(fusedres_ext, CPU, m) {
  m.impl("bn_add_act", &fusedres::bn_add_act_cpu_op);
  m.impl("bn_finalize", &fusedres::bn_finalize_cpu_op);
  m.impl("batch_stats", &fusedres::batch_stats_cpu_op);
  m.impl("bn_backward_reduce", &fusedres::bn_backward_reduce_cpu_op);
  m.impl("bn_backward_apply", &fusedres::bn_backward_apply_cpu_op);
  m.impl("bn_apply_relu", &fusedres::bn_apply_relu_cpu_op);
  m.impl("act_grad", &fusedres::act_grad_cpu_op);
  m.impl("relu_", &fusedres::relu_cpu_op);
  m.impl("max_pool2d", &fusedres::max_pool2d_cpu_op);
  m.impl("fold_scale", &fusedres::fold_scale_cpu_op);
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
