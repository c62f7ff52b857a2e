// CUTLASS convolution kernels vs a host reference.
//
//   test_conv_cuda --host-only   support predicate vs CUTLASS's can_implement() on a sweep of
//                                shapes, and which of them the Hopper-native forward takes
//                                (no GPU needed; CTest conv_cutlass_predicate)
//   test_conv_cuda               the above, then every kernel on the GPU (CTest conv_cuda;
//                                exit code 77 = skipped when there is no GPU)
//
// GPU cases use small-integer inputs (and scale/shift in {0.5, 1, 2} / {-1, 0, 1}) so that
// every product, sum and rounding to float16/bfloat16 is exact: the kernels must then match
// the double-precision reference exactly, whatever their summation order. Shapes: odd
// spatial sizes, stride 2, padding, 1x1 stride-2 shortcuts (dgrad phases no tap reaches),
// channel counts that are not multiples of the 32-wide K tile, residual, ReLU, NaN in the
// epilogue, split-K wgrad, KRSC and KCRS weight gradients, the grouped forward, and the
// statistics kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "conv_cutlass.h"

using namespace fusedres;

#define CUDA_OK(x)                                                                          \
  do {                                                                                      \
    cudaError_t e_ = (x);                                                                   \
    if (e_ != cudaSuccess) {                                                                \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);  \
      std::exit(2);                                                                         \
    }                                                                                       \
  } while (0)

namespace {

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok && g_failures++ < 20) std::printf("FAIL %s\n", what.c_str());
}

ConvGeometry geom(int64_t n, int64_t h, int64_t w, int64_t c, int64_t k, int64_t r, int64_t s, int64_t pad,
                  int64_t stride, int64_t dil = 1) {
  ConvGeometry g;
  g.n = n;
  g.h = h;
  g.w = w;
  g.c = c;
  g.k = k;
  g.r = r;
  g.s = s;
  g.pad_h = g.pad_w = pad;
  g.stride_h = g.stride_w = stride;
  g.dil_h = g.dil_w = dil;
  g.p = conv_out_size(h, pad, dil, r, stride);
  g.q = conv_out_size(w, pad, dil, s, stride);
  return g;
}

std::string describe(const ConvGeometry& g) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "N%lld H%lld W%lld C%lld K%lld R%lld S%lld pad%lld stride%lld dil%lld",
                (long long)g.n, (long long)g.h, (long long)g.w, (long long)g.c, (long long)g.k, (long long)g.r,
                (long long)g.s, (long long)g.pad_h, (long long)g.stride_h, (long long)g.dil_h);
  return buf;
}

// ----------------------------------------------------------------------- host-only part

// f(g) for every geometry of the host sweep: channels, filter sizes, strides, paddings,
// dilations and spatial sizes around the ResNet ones
template <typename F>
void for_each_sweep_geometry(F&& f) {
  for (int64_t c : {8, 16, 24, 64, 256})
    for (int64_t k : {8, 40, 64, 512})
      for (int64_t rs : {1, 3, 5, 7})
        for (int64_t stride : {1, 2})
          for (int64_t pad : {0, 1, 3})
            for (int64_t dil : {1, 2})
              for (int64_t hw : {1, 7, 14, 56}) f(geom(3, hw, hw + 2, c, k, rs, rs, pad, stride, dil));
}

void test_predicate() {
  const ConvKind kinds[] = {ConvKind::kFprop, ConvKind::kFpropPrologue, ConvKind::kDgrad, ConvKind::kWgrad,
                            ConvKind::kWgradPrologue};
  const ConvDtype dtypes[] = {ConvDtype::kFloat16, ConvDtype::kBFloat16};
  int accepted = 0, checked = 0;
  for_each_sweep_geometry([&](const ConvGeometry& g) {
    for (ConvKind kind : kinds)
      for (ConvDtype dt : dtypes) {
        ConvCallFlags f;
        f.input_relu = kind == ConvKind::kFpropPrologue || kind == ConvKind::kWgradPrologue;
        if (conv_cutlass_unsupported(kind, dt, g, f) != nullptr) continue;
        ++accepted;
        for (int split : {1, conv_wgrad_split_k(g)}) {
          if (split > 1 && kind != ConvKind::kWgrad && kind != ConvKind::kWgradPrologue) continue;
          ++checked;
          const ConvStatus st = conv_cutlass_check(kind, dt, g, f, split);
          expect(st == ConvStatus::kOk, "predicate accepts but CUTLASS refuses: kind " + std::to_string(int(kind)) +
                                            " split " + std::to_string(split) + " " + describe(g));
        }
      }
  });
  std::printf("predicate: %d accepted calls, %d checked against can_implement()\n", accepted, checked);
  expect(accepted > 1000, "predicate sweep accepted too few shapes");

  // grouped forward: every accepted call must pass the group kernel's can_implement(); the
  // ResNeXt shapes with 32 or 64 channels per group must be accepted, the rest refused
  int grouped_accepted = 0;
  for (int64_t groups : {2, 4, 32, 64})
    for (int64_t cpg : {8, 16, 32, 64, 96})
      for (int64_t kpg : {8, 16, 24, 32, 64, 128})
        for (int64_t stride : {1, 2})
          for (int64_t dil : {1, 2})
            for (int64_t hw : {1, 7, 14})
              for (bool bias : {false, true}) {
                ConvGeometry g = geom(2, hw, hw + 1, cpg * groups, kpg * groups, 3, 3, dil, stride, dil);
                g.groups = groups;
                ConvCallFlags f;
                f.has_bias = bias;
                const bool want = cpg % 32 == 0 && (kpg == 8 || kpg == 16 || kpg == 32 || kpg == 64);
                for (ConvDtype dt : dtypes) {
                  const char* why = conv_cutlass_unsupported(ConvKind::kFprop, dt, g, f);
                  expect((why == nullptr) == want, "grouped predicate: groups " + std::to_string(groups) + " cpg " +
                                                       std::to_string(cpg) + " kpg " + std::to_string(kpg) + " " +
                                                       (why ? why : "accepted"));
                  if (why != nullptr) continue;
                  ++grouped_accepted;
                  const ConvStatus st = conv_cutlass_check(ConvKind::kFprop, dt, g, f);
                  expect(st == ConvStatus::kOk, "grouped: predicate accepts but CUTLASS refuses: groups " +
                                                    std::to_string(groups) + " " + describe(g));
                  for (ConvKind other : {ConvKind::kFpropPrologue, ConvKind::kDgrad, ConvKind::kWgrad,
                                         ConvKind::kWgradPrologue}) {
                    ConvCallFlags fo;
                    fo.input_relu = other == ConvKind::kFpropPrologue || other == ConvKind::kWgradPrologue;
                    expect(conv_cutlass_unsupported(other, dt, g, fo) != nullptr,
                           "grouped kind " + std::to_string(int(other)) + " refused");
                  }
                  ConvCallFlags fr = f;
                  fr.has_residual = true;
                  expect(conv_cutlass_unsupported(ConvKind::kFprop, dt, g, fr) != nullptr, "grouped residual refused");
                }
              }
  std::printf("predicate: %d accepted grouped calls checked against can_implement()\n", grouped_accepted);
  expect(grouped_accepted > 100, "grouped predicate sweep accepted too few shapes");

  // what must fall back to ATen
  ConvCallFlags plain;
  const ConvGeometry r50 = geom(32, 56, 56, 64, 64, 3, 3, 1, 1);
  expect(conv_cutlass_unsupported(ConvKind::kFprop, ConvDtype::kBFloat16, r50, plain) == nullptr, "r50 3x3 fprop");
  expect(conv_cutlass_unsupported(ConvKind::kFprop, ConvDtype::kOther, r50, plain) != nullptr, "fp32 refused");
  expect(conv_cutlass_unsupported(ConvKind::kFprop, ConvDtype::kFloat16, geom(8, 224, 224, 3, 64, 7, 7, 3, 2), plain) !=
             nullptr,
         "3-channel stem refused");
  ConvGeometry grouped = r50;
  grouped.groups = 32;
  expect(conv_cutlass_unsupported(ConvKind::kFprop, ConvDtype::kFloat16, grouped, plain) != nullptr, "groups refused");
  expect(conv_cutlass_unsupported(ConvKind::kDgrad, ConvDtype::kFloat16, geom(2, 9, 9, 16, 16, 3, 3, 2, 1, 2),
                                  plain) != nullptr,
         "dilated dgrad refused");
  expect(conv_cutlass_unsupported(ConvKind::kFprop, ConvDtype::kFloat16, geom(2, 40, 40, 16, 16, 33, 33, 16, 1),
                                  plain) != nullptr,
         "33x33 filter refused");
  ConvCallFlags with_residual, with_bias;
  with_residual.has_residual = true;
  with_bias.has_bias = true;
  expect(conv_cutlass_unsupported(ConvKind::kDgrad, ConvDtype::kBFloat16, r50, with_residual) == nullptr,
         "dgrad with an addend accepted");
  expect(conv_cutlass_unsupported(ConvKind::kDgrad, ConvDtype::kBFloat16, r50, with_bias) != nullptr,
         "dgrad with a bias refused");
  expect(conv_cutlass_unsupported(ConvKind::kWgrad, ConvDtype::kBFloat16, r50, with_residual) != nullptr,
         "wgrad with a residual refused");
  ConvCallFlags prologue_bias;
  prologue_bias.input_relu = true;
  prologue_bias.has_bias = true;
  expect(conv_cutlass_unsupported(ConvKind::kFpropPrologue, ConvDtype::kFloat16, r50, prologue_bias) != nullptr,
         "prologue with bias refused");
  ConvCallFlags no_relu;
  expect(conv_cutlass_unsupported(ConvKind::kWgradPrologue, ConvDtype::kFloat16, r50, no_relu) != nullptr,
         "prologue without ReLU refused");
}

// The Hopper-native forward (CUTLASS 3.x): which calls of the support predicate its
// can_implement() takes (the rest fall back to the Sm80 kernel at run time), and that it
// takes every ResNet-50 forward convolution after the stem, with and without a residual.
void test_sm90_host() {
  if (!conv_sm90_built()) {
    std::printf("sm90: the Hopper-native forward is not compiled in: not checked\n");
    return;
  }
  int accepted = 0, taken = 0;
  for_each_sweep_geometry([&](const ConvGeometry& g) {
    for (bool residual : {false, true}) {
      ConvCallFlags f;
      f.has_bias = true;
      f.has_residual = residual;
      if (conv_cutlass_unsupported(ConvKind::kFprop, ConvDtype::kBFloat16, g, f) != nullptr) continue;
      ++accepted;
      const ConvStatus st = conv_cutlass_check_sm90(ConvDtype::kBFloat16, g, f);
      expect(st == ConvStatus::kOk || st == ConvStatus::kUnsupported, "sm90 check status " + describe(g));
      taken += st == ConvStatus::kOk;
      // the kernel is bfloat16 only: the same call in float16 is refused
      expect(conv_cutlass_check_sm90(ConvDtype::kFloat16, g, f) == ConvStatus::kUnsupported,
             "sm90 takes float16 " + describe(g));
    }
  });
  std::printf("sm90: CUTLASS 3.x can_implement() takes %d of %d accepted bfloat16 forward calls\n", taken, accepted);
  struct Layer {
    int64_t hw, c, k, rs, stride;
  };
  // ResNet-50 v1.5 at 224x224: every forward convolution after the 7x7 stem (3 channels)
  const Layer r50[] = {
      {56, 64, 64, 1, 1},     {56, 64, 64, 3, 1},      {56, 64, 256, 1, 1},    {56, 256, 64, 1, 1},
      {56, 256, 128, 1, 1},   {56, 128, 128, 3, 2},    {28, 128, 512, 1, 1},   {56, 256, 512, 1, 2},
      {28, 512, 128, 1, 1},   {28, 128, 128, 3, 1},    {28, 512, 256, 1, 1},   {28, 256, 256, 3, 2},
      {14, 256, 1024, 1, 1},  {28, 512, 1024, 1, 2},   {14, 1024, 256, 1, 1},  {14, 256, 256, 3, 1},
      {14, 1024, 512, 1, 1},  {14, 512, 512, 3, 2},    {7, 512, 2048, 1, 1},   {14, 1024, 2048, 1, 2},
      {7, 2048, 512, 1, 1},   {7, 512, 512, 3, 1}};
  for (const Layer& l : r50)
    for (bool residual : {false, true}) {
      const ConvGeometry g = geom(32, l.hw, l.hw, l.c, l.k, l.rs, l.rs, l.rs / 2, l.stride);
      ConvCallFlags f;
      f.has_bias = true;
      f.has_residual = residual;
      expect(conv_cutlass_check_sm90(ConvDtype::kBFloat16, g, f) == ConvStatus::kOk,
             "sm90 refuses a ResNet-50 layer: " + describe(g) + (residual ? " with residual" : ""));
    }
  ConvGeometry grouped = geom(2, 14, 14, 64, 64, 3, 3, 1, 1);
  grouped.groups = 2;
  ConvCallFlags plain;
  expect(conv_cutlass_check_sm90(ConvDtype::kBFloat16, grouped, plain) == ConvStatus::kUnsupported,
         "sm90 takes a grouped convolution");
}

// ----------------------------------------------------------------------------- GPU part

template <typename T>
T to_t(double v);
template <>
__half to_t<__half>(double v) { return __float2half_rn(float(v)); }
template <>
__nv_bfloat16 to_t<__nv_bfloat16>(double v) { return __float2bfloat16_rn(float(v)); }
double to_d(__half v) { return double(__half2float(v)); }
double to_d(__nv_bfloat16 v) { return double(__bfloat162float(v)); }

template <typename T>
constexpr ConvDtype dtype_of() {
  return std::is_same<T, __half>::value ? ConvDtype::kFloat16 : ConvDtype::kBFloat16;
}

struct Rng {
  std::mt19937_64 g{1234};
  std::vector<double> ints(size_t n, int lo, int hi) {
    std::uniform_int_distribution<int> d(lo, hi);
    std::vector<double> v(n);
    for (auto& x : v) x = d(g);
    return v;
  }
  std::vector<double> pick(size_t n, std::vector<double> choices) {
    std::uniform_int_distribution<size_t> d(0, choices.size() - 1);
    std::vector<double> v(n);
    for (auto& x : v) x = choices[d(g)];
    return v;
  }
};

template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(const std::vector<double>& h) : n(h.size()) {
    std::vector<T> t(n);
    for (size_t i = 0; i < n; ++i) t[i] = to_t<T>(h[i]);
    CUDA_OK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
    CUDA_OK(cudaMemcpy(p, t.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  explicit Dev(size_t count) : n(count) {
    CUDA_OK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
    CUDA_OK(cudaMemset(p, 0xff, n * sizeof(T)));  // NaN-ish garbage: every output must be written
  }
  ~Dev() { cudaFree(p); }
  std::vector<double> get() const {
    std::vector<T> t(n);
    CUDA_OK(cudaMemcpy(t.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<double> h(n);
    for (size_t i = 0; i < n; ++i) h[i] = to_d(t[i]);
    return h;
  }
};

struct DevF {
  float* p = nullptr;
  explicit DevF(const std::vector<double>& h) {
    std::vector<float> t(h.begin(), h.end());
    CUDA_OK(cudaMalloc(&p, std::max<size_t>(t.size(), 1) * sizeof(float)));
    CUDA_OK(cudaMemcpy(p, t.data(), t.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  ~DevF() { cudaFree(p); }
};

struct DevBytes {
  void* p = nullptr;
  explicit DevBytes(size_t bytes) { CUDA_OK(cudaMalloc(&p, std::max<size_t>(bytes, 16))); }
  ~DevBytes() { cudaFree(p); }
};

size_t xi(const ConvGeometry& g, int64_t n, int64_t h, int64_t w, int64_t c) { return ((n * g.h + h) * g.w + w) * g.c + c; }
size_t yi(const ConvGeometry& g, int64_t n, int64_t p, int64_t q, int64_t k) { return ((n * g.p + p) * g.q + q) * g.k + k; }
size_t wi(const ConvGeometry& g, int64_t k, int64_t r, int64_t s, int64_t c) { return ((k * g.r + r) * g.s + s) * g.c + c; }

double relu_ref(double v) { return (v > 0 || v != v) ? v : 0.0; }

// h = relu(x*scale + shift) where a prologue is given; padding stays 0 either way
std::vector<double> prologue_ref(const ConvGeometry& g, const std::vector<double>& x, const std::vector<double>* s,
                                 const std::vector<double>* t) {
  if (s == nullptr) return x;
  std::vector<double> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) h[i] = relu_ref(x[i] * (*s)[i % g.c] + (*t)[i % g.c]);
  return h;
}

std::vector<double> fprop_ref(const ConvGeometry& g, const std::vector<double>& h, const std::vector<double>& w) {
  // output channel k reads the C/groups input channels of its group; w is [K, R, S, C/groups]
  const int64_t cpg = g.c / g.groups, kpg = g.k / g.groups;
  std::vector<double> y(g.n * g.p * g.q * g.k, 0.0);
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t p = 0; p < g.p; ++p)
      for (int64_t q = 0; q < g.q; ++q)
        for (int64_t k = 0; k < g.k; ++k) {
          const int64_t c0 = (k / kpg) * cpg;
          double acc = 0;
          for (int64_t r = 0; r < g.r; ++r)
            for (int64_t s = 0; s < g.s; ++s) {
              const int64_t ih = p * g.stride_h - g.pad_h + r * g.dil_h, iw = q * g.stride_w - g.pad_w + s * g.dil_w;
              if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
              for (int64_t c = 0; c < cpg; ++c)
                acc += h[xi(g, n, ih, iw, c0 + c)] * w[((k * g.r + r) * g.s + s) * cpg + c];
            }
          y[yi(g, n, p, q, k)] = acc;
        }
  return y;
}

bool same(double a, double b) { return (a != a && b != b) || a == b; }

// `want` is exact (double); the kernels accumulate exactly in float32 (small integers and
// halves) and round once to T, so they must equal `want` rounded once to T
template <typename T>
void check_all(const char* what, const ConvGeometry& g, const std::vector<double>& got, std::vector<double> want) {
  size_t bad = 0, first = 0;
  for (auto& v : want) v = to_d(to_t<T>(v));
  for (size_t i = 0; i < want.size(); ++i)
    if (!same(got[i], want[i]) && bad++ == 0) first = i;
  char buf[128];
  std::snprintf(buf, sizeof buf, " (%s): %zu of %zu differ, first at %zu: got %g want %g", dtype_of<T>() == ConvDtype::kFloat16 ? "f16" : "bf16", bad, want.size(), first,
                bad ? got[first] : 0.0, bad ? want[first] : 0.0);
  expect(bad == 0, std::string(what) + " " + describe(g) + buf);
}

template <typename T>
void run_fprop(const ConvGeometry& g, bool bias, bool residual, bool relu, bool prologue, Rng& rng,
               bool hopper = false) {
  auto x = rng.ints(g.n * g.h * g.w * g.c, -2, 2);
  const auto w = rng.ints(g.k * g.r * g.s * (g.c / g.groups), -1, 1);
  auto b = rng.ints(g.k, -3, 3);
  const auto res = rng.ints(g.n * g.p * g.q * g.k, -4, 4);
  const auto sc = rng.pick(g.c, {0.5, 1.0, 2.0});
  const auto sh = rng.pick(g.c, {-1.0, 0.0, 1.0});
  if (bias) b[0] = NAN;  // must survive the ReLU as NaN
  // grouped: an Inf in the last group's channels must not leak into the other groups' outputs
  if (g.groups > 1) x[g.c - 1] = INFINITY;
  Dev<T> dx(x), dw(w), dres(res), dsc(sc), dsh(sh), dy(g.n * g.p * g.q * g.k), db16(b);
  DevF db(b);
  ConvFpropParams p;
  p.g = g;
  p.dtype = dtype_of<T>();
  p.x = dx.p;
  p.w = dw.p;
  p.y = dy.p;
  // the grouped kernel takes its bias in the storage dtype (b holds small integers: exact)
  p.bias = bias && g.groups == 1 ? db.p : nullptr;
  p.bias_storage = bias && g.groups > 1 ? db16.p : nullptr;
  p.residual = residual ? dres.p : nullptr;
  p.in_scale = prologue ? dsc.p : nullptr;
  p.in_shift = prologue ? dsh.p : nullptr;
  p.relu = relu;
  p.hopper = hopper;
  const ConvStatus st = conv_fprop_cutlass(p, nullptr);
  expect(st == ConvStatus::kOk, std::string("conv_fprop_cutlass status: ") + conv_status_string(st) + " " + describe(g));
  if (st != ConvStatus::kOk) return;
  CUDA_OK(cudaDeviceSynchronize());
  auto want = fprop_ref(g, prologue_ref(g, x, prologue ? &sc : nullptr, &sh), w);
  for (size_t i = 0; i < want.size(); ++i) {
    double z = want[i];
    if (bias) z += b[i % g.k];
    if (residual) z += res[i];
    want[i] = relu ? relu_ref(z) : z;
  }
  check_all<T>(prologue ? "fprop_prologue" : g.groups > 1 ? "fprop_group" : hopper ? "fprop_sm90" : "fprop", g,
               dy.get(), want);
}

template <typename T>
void run_dgrad(const ConvGeometry& g, bool addend, Rng& rng) {
  const auto dy = rng.ints(g.n * g.p * g.q * g.k, -2, 2);
  const auto w = rng.ints(g.k * g.r * g.s * g.c, -1, 1);
  const auto add = rng.ints(g.n * g.h * g.w * g.c, -4, 4);
  Dev<T> ddy(dy), dw(w), dadd(add), ddx(g.n * g.h * g.w * g.c);
  ConvDgradParams p;
  p.g = g;
  p.dtype = dtype_of<T>();
  p.dy = ddy.p;
  p.w = dw.p;
  p.addend = addend ? dadd.p : nullptr;
  p.dx = ddx.p;
  const ConvStatus st = conv_dgrad_cutlass(p, nullptr);
  expect(st == ConvStatus::kOk, std::string("conv_dgrad_cutlass status: ") + conv_status_string(st) + " " + describe(g));
  if (st != ConvStatus::kOk) return;
  CUDA_OK(cudaDeviceSynchronize());
  // with the addend, dx starts from it: pixels no filter tap reaches (1x1 stride-2 phases)
  // must come out as the addend alone
  std::vector<double> want(g.n * g.h * g.w * g.c, 0.0);
  if (addend) want.assign(add.begin(), add.end());
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t pp = 0; pp < g.p; ++pp)
      for (int64_t q = 0; q < g.q; ++q)
        for (int64_t r = 0; r < g.r; ++r)
          for (int64_t s = 0; s < g.s; ++s) {
            const int64_t ih = pp * g.stride_h - g.pad_h + r, iw = q * g.stride_w - g.pad_w + s;
            if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
            for (int64_t k = 0; k < g.k; ++k)
              for (int64_t c = 0; c < g.c; ++c) want[xi(g, n, ih, iw, c)] += dy[yi(g, n, pp, q, k)] * w[wi(g, k, r, s, c)];
          }
  check_all<T>(addend ? "dgrad_addend" : "dgrad", g, ddx.get(), want);
}

template <typename T>
void run_wgrad(const ConvGeometry& g, bool prologue, bool kcrs, int split_k, Rng& rng) {
  const auto dy = rng.ints(g.n * g.p * g.q * g.k, -1, 1);
  const auto x = rng.ints(g.n * g.h * g.w * g.c, -2, 2);
  const auto sc = rng.pick(g.c, {0.5, 1.0, 2.0});
  const auto sh = rng.pick(g.c, {-1.0, 0.0, 1.0});
  Dev<T> ddy(dy), dx(x), dsc(sc), dsh(sh), ddw(g.k * g.r * g.s * g.c);
  DevBytes ws(conv_wgrad_workspace_bytes(g, split_k));
  ConvWgradParams p;
  p.g = g;
  p.dtype = dtype_of<T>();
  p.dy = ddy.p;
  p.x = dx.p;
  p.in_scale = prologue ? dsc.p : nullptr;
  p.in_shift = prologue ? dsh.p : nullptr;
  p.dw = ddw.p;
  p.dw_kcrs = kcrs;
  p.split_k = split_k;
  p.workspace = ws.p;
  const ConvStatus st = conv_wgrad_cutlass(p, nullptr);
  expect(st == ConvStatus::kOk, std::string("conv_wgrad_cutlass status: ") + conv_status_string(st) + " " + describe(g));
  if (st != ConvStatus::kOk) return;
  CUDA_OK(cudaDeviceSynchronize());
  const auto h = prologue_ref(g, x, prologue ? &sc : nullptr, &sh);
  std::vector<double> want(g.k * g.r * g.s * g.c, 0.0);
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t pp = 0; pp < g.p; ++pp)
      for (int64_t q = 0; q < g.q; ++q)
        for (int64_t r = 0; r < g.r; ++r)
          for (int64_t s = 0; s < g.s; ++s) {
            const int64_t ih = pp * g.stride_h - g.pad_h + r * g.dil_h, iw = q * g.stride_w - g.pad_w + s * g.dil_w;
            if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
            for (int64_t k = 0; k < g.k; ++k)
              for (int64_t c = 0; c < g.c; ++c) {
                const size_t o = kcrs ? ((k * g.c + c) * g.r + r) * g.s + s : wi(g, k, r, s, c);
                want[o] += dy[yi(g, n, pp, q, k)] * h[xi(g, n, ih, iw, c)];
              }
          }
  check_all<T>(prologue ? (kcrs ? "wgrad_prologue/kcrs" : "wgrad_prologue") : (kcrs ? "wgrad/kcrs" : "wgrad"), g,
               ddw.get(), want);
}

template <typename T>
void run_stats(int64_t m, int64_t k, Rng& rng) {
  auto y = rng.ints(m * k, -50, 50);
  for (auto& v : y) v = v / 8.0 + 3.0;  // exact in both 16-bit types, nonzero mean
  Dev<T> dy(y);
  std::vector<double> zeros(3 * k, 0.0);
  DevF out(zeros);
  DevBytes ws(conv_stats_workspace_bytes(m, k));
  const ConvStatus st = conv_stats_nhwc(dtype_of<T>(), dy.p, m, k, out.p, ws.p, nullptr);
  expect(st == ConvStatus::kOk, std::string("conv_stats_nhwc status: ") + conv_status_string(st));
  if (st != ConvStatus::kOk) return;
  std::vector<float> got(3 * k);
  CUDA_OK(cudaMemcpy(got.data(), out.p, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
  std::vector<float> again(3 * k);
  CUDA_OK(conv_stats_nhwc(dtype_of<T>(), dy.p, m, k, out.p, ws.p, nullptr) == ConvStatus::kOk ? cudaSuccess
                                                                                               : cudaErrorUnknown);
  CUDA_OK(cudaMemcpy(again.data(), out.p, again.size() * sizeof(float), cudaMemcpyDeviceToHost));
  expect(std::memcmp(got.data(), again.data(), got.size() * sizeof(float)) == 0, "stats not bitwise reproducible");
  for (int64_t c = 0; c < k; ++c) {
    double mean = 0, m2 = 0;
    for (int64_t i = 0; i < m; ++i) mean += y[i * k + c];
    mean /= double(m);
    for (int64_t i = 0; i < m; ++i) m2 += (y[i * k + c] - mean) * (y[i * k + c] - mean);
    const bool ok = got[c] == float(m) && std::fabs(got[k + c] - mean) <= 1e-5 * (1 + std::fabs(mean)) &&
                    std::fabs(got[2 * k + c] - m2) <= 1e-5 * (1 + m2);
    char buf[160];
    std::snprintf(buf, sizeof buf, "stats m=%lld k=%lld channel %lld: got (%g, %g, %g) want (%lld, %g, %g)", (long long)m,
                  (long long)k, (long long)c, got[c], got[k + c], got[2 * k + c], (long long)m, mean, m2);
    expect(ok, buf);
  }
}

template <typename T>
int run_gpu() {
  Rng rng;
  const int before = g_failures;
  // (geometry, with bias/residual/relu variations)
  const ConvGeometry shapes[] = {
      geom(2, 7, 9, 16, 24, 3, 3, 1, 1),   // odd spatial, padding, K not a multiple of the tile
      geom(2, 9, 7, 16, 16, 3, 3, 1, 2),   // stride 2
      geom(3, 8, 8, 32, 64, 1, 1, 0, 2),   // 1x1 stride-2 shortcut
      geom(1, 5, 5, 8, 8, 3, 3, 0, 1),     // no padding, minimal channels
      geom(2, 11, 11, 24, 40, 5, 5, 2, 2), // 5x5 stride 2
      geom(2, 15, 13, 64, 136, 3, 3, 1, 1),  // several N tiles
  };
  for (const auto& g : shapes) {
    // the Hopper-native forward where asked for (bfloat16 on an sm_90 device; elsewhere the
    // same call runs the Sm80 kernel), every epilogue combination
    for (int e = 0; e < 8; ++e) run_fprop<T>(g, e & 1, e & 2, e & 4, false, rng, true);
    run_fprop<T>(g, true, true, true, false, rng);
    run_fprop<T>(g, true, false, false, false, rng);
    run_fprop<T>(g, false, true, true, false, rng);
    run_fprop<T>(g, false, false, false, false, rng);
    run_fprop<T>(g, false, false, false, true, rng);
    run_fprop<T>(g, false, true, true, true, rng);
    run_dgrad<T>(g, false, rng);
    run_dgrad<T>(g, true, rng);
    for (bool prologue : {false, true}) {
      run_wgrad<T>(g, prologue, true, 1, rng);
      run_wgrad<T>(g, prologue, false, 3, rng);
      run_wgrad<T>(g, prologue, true, conv_wgrad_split_k(g), rng);
    }
  }
  run_fprop<T>(geom(2, 9, 9, 16, 16, 3, 3, 2, 1, 2), true, true, true, false, rng);  // dilation 2
  run_wgrad<T>(geom(2, 9, 9, 16, 16, 3, 3, 2, 1, 2), true, true, 2, rng);
  run_dgrad<T>(geom(2, 10, 10, 16, 8, 3, 3, 1, 2), true, rng);
  // grouped forward: (groups, channels per group, output channels per group) as ResNeXt
  // uses them and at the tile's edges (8 and 64 output channels per group, 2 and 8 groups per
  // tile), with stride 2, padding and odd spatial sizes
  for (const auto& gs : {std::array<int64_t, 6>{2, 32, 8, 1, 1, 9}, std::array<int64_t, 6>{4, 32, 32, 2, 1, 7},
                         std::array<int64_t, 6>{3, 64, 64, 1, 2, 5}, std::array<int64_t, 6>{8, 32, 16, 2, 1, 11}}) {
    ConvGeometry g = geom(2, gs[5], gs[5] + 2, gs[0] * gs[1], gs[0] * gs[2], 3, 3, gs[4], gs[3], gs[4]);
    g.groups = gs[0];
    run_fprop<T>(g, true, false, true, false, rng);
    run_fprop<T>(g, false, false, false, false, rng);
  }
  run_stats<T>(1, 8, rng);
  run_stats<T>(1000, 24, rng);   // several row tiles, last one partial
  run_stats<T>(3000, 264, rng);  // channel blocks beyond 256
  return g_failures - before;
}

}  // namespace

int main(int argc, char** argv) {
  const bool host_only = argc > 1 && std::strcmp(argv[1], "--host-only") == 0;
  if (!conv_cutlass_built()) {
    std::printf("compiled without CUTLASS: skipped\n");
    return 77;
  }
  std::printf("%s\n", conv_cutlass_description());
  test_predicate();
  test_sm90_host();
  if (host_only) {
    std::printf("test_conv_cuda --host-only: %s\n", g_failures == 0 ? "passed" : "FAILED");
    return g_failures == 0 ? 0 : 1;
  }
  int dev = 0;
  if (cudaGetDeviceCount(&dev) != cudaSuccess || dev == 0) {
    std::printf("no CUDA device: GPU part skipped (host part %s)\n", g_failures == 0 ? "passed" : "FAILED");
    return g_failures == 0 ? 77 : 1;
  }
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  std::printf("device compute capability %d.%d: the Hopper-native forward %s\n", major, minor,
              !conv_sm90_built() ? "is not built"
              : major == 9 && minor == 0 ? "runs the fprop_sm90 cases"
                                         : "is not for this device (fprop_sm90 cases run the Sm80 kernel)");
  const int f16 = run_gpu<__half>();
  const int bf16 = run_gpu<__nv_bfloat16>();
  std::printf("test_conv_cuda: float16 %d failures, bfloat16 %d failures, %d in total\n", f16, bf16, g_failures);
  return g_failures == 0 ? 0 : 1;
}
