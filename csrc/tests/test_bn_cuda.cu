// CUDA kernels vs the host reference (needs a GPU): fp32/fp64/fp16/bf16 storage, both
// layouts, vector and scalar paths (C multiple of the vector width or not), every
// residual mode, NaN propagation, and a deterministic finalize (two runs bitwise equal).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "bn_cpu.h"
#include "bn_cuda.cuh"
#include "reference.h"

using namespace fusedres;
using namespace fusedres_test;

#define CUDA_OK(x)                                                                                  \
  do {                                                                                              \
    cudaError_t e_ = (x);                                                                           \
    if (e_ != cudaSuccess) {                                                                        \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);          \
      std::exit(2);                                                                                 \
    }                                                                                               \
  } while (0)

template <typename T>
static T to_t(double v) { return T(v); }
template <>
__half to_t<__half>(double v) { return __float2half_rn(float(v)); }
template <>
__nv_bfloat16 to_t<__nv_bfloat16>(double v) { return __float2bfloat16_rn(float(v)); }
template <typename T>
static double to_d(T v) { return double(v); }
template <>
double to_d<__half>(__half v) { return double(__half2float(v)); }
template <>
double to_d<__nv_bfloat16>(__nv_bfloat16 v) { return double(__bfloat162float(v)); }

template <typename T>
static T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, h.size() * sizeof(T) + 16));
  CUDA_OK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T, typename S>
static int run(int64_t N, int64_t C, int64_t HW, Layout layout, int mode, bool relu, double tol, Rng& rng) {
  const int64_t total = N * C * HW;
  auto yd = rng.normal(total), rd = rng.normal(total);
  yd[1] = std::nan("");  // NaN must survive the ReLU
  std::vector<T> y(total), r(total), out(total);
  for (int64_t i = 0; i < total; ++i) {
    y[i] = to_t<T>(yd[i]);
    r[i] = to_t<T>(rd[i]);
  }
  auto s = rng.normal(C), t = rng.normal(C), rs = rng.normal(C), rt = rng.normal(C), k = rng.normal(N);
  std::vector<S> sS(s.begin(), s.end()), tS(t.begin(), t.end()), rsS(rs.begin(), rs.end()), rtS(rt.begin(), rt.end()),
      kS(k.begin(), k.end());
  const bool has_r = mode >= 1, dual = mode >= 2, sample = mode == 3;
  T *dy = upload(y), *dr = upload(r), *dout = upload(out);
  S *ds = upload(sS), *dt = upload(tS), *drs = upload(rsS), *drt = upload(rtS), *dk = upload(kS);
  BnAddActParams<S> p;
  p.n = N;
  p.c = C;
  p.hw = HW;
  p.layout = layout;
  p.scale = ds;
  p.shift = dt;
  p.res_scale = dual ? drs : nullptr;
  p.res_shift = dual ? drt : nullptr;
  p.sample_scale = sample ? dk : nullptr;
  p.relu = relu;
  CUDA_OK((bn_add_act_cuda<T, S>(dy, has_r ? dr : nullptr, dout, p, nullptr)));
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(out.data(), dout, total * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<double> sd(sS.begin(), sS.end()), td(tS.begin(), tS.end()), rsd(rsS.begin(), rsS.end()),
      rtd(rtS.begin(), rtS.end()), kd(kS.begin(), kS.end());
  Failures f;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < HW; ++i) {
        const int64_t o = offset(layout, n, c, i, C, HW);
        const double want = ref_bn_add_act(to_d(y[o]), to_d(r[o]), has_r, c, n, sd, td, dual ? &rsd : nullptr,
                                           dual ? &rtd : nullptr, sample ? &kd : nullptr, relu);
        f.check(close(to_d(out[o]), want, tol), "bn_add_act_cuda", to_d(out[o]), want);
      }
  for (void* q : {(void*)dy, (void*)dr, (void*)dout, (void*)ds, (void*)dt, (void*)drs, (void*)drt, (void*)dk})
    CUDA_OK(cudaFree(q));
  return f.count;
}

template <typename S>
static int run_finalize(int64_t C, Rng& rng) {
  const int64_t T = 5;
  std::vector<S> partials(T * 3 * C);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      partials[(t * 3 + 0) * C + c] = S(t == 1 ? 0 : 8 + t);
      partials[(t * 3 + 1) * C + c] = S(rng.normal(1)[0]);
      partials[(t * 3 + 2) * C + c] = S(std::fabs(rng.normal(1)[0]) * 5);
    }
  auto g = rng.normal(C), b = rng.normal(C);
  std::vector<S> gamma(g.begin(), g.end()), beta(b.begin(), b.end()), rm(C, S(0.1)), rv(C, S(1.5));
  // host result from the (separately tested) CPU kernel
  std::vector<S> hm(C), hi(C), hs(C), hsh(C), hrm = rm, hrv = rv;
  BnFinalizeParams<S> hp;
  hp.tiles = T;
  hp.c = C;
  hp.partials = partials.data();
  hp.gamma = gamma.data();
  hp.beta = beta.data();
  hp.running_mean = hrm.data();
  hp.running_var = hrv.data();
  hp.momentum = 0.2;
  hp.mean = hm.data();
  hp.invstd = hi.data();
  hp.scale = hs.data();
  hp.shift = hsh.data();
  bn_finalize_cpu<S>(hp, 0, C);
  Failures f;
  std::vector<S> first;
  for (int rep = 0; rep < 2; ++rep) {
    S *dp = upload(partials), *dg = upload(gamma), *db = upload(beta), *drm = upload(rm), *drv = upload(rv);
    std::vector<S> zeros(C);
    S *dm = upload(zeros), *di = upload(zeros), *ds = upload(zeros), *dsh = upload(zeros);
    BnFinalizeParams<S> p = hp;
    p.partials = dp;
    p.gamma = dg;
    p.beta = db;
    p.running_mean = drm;
    p.running_var = drv;
    p.mean = dm;
    p.invstd = di;
    p.scale = ds;
    p.shift = dsh;
    CUDA_OK(bn_finalize_cuda<S>(p, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<S> got(6 * C);
    S* outs[6] = {dm, di, ds, dsh, drm, drv};
    for (int j = 0; j < 6; ++j) CUDA_OK(cudaMemcpy(got.data() + j * C, outs[j], C * sizeof(S), cudaMemcpyDeviceToHost));
    const std::vector<S>* want[6] = {&hm, &hi, &hs, &hsh, &hrm, &hrv};
    for (int j = 0; j < 6; ++j)
      for (int64_t c = 0; c < C; ++c)
        f.check(close(got[j * C + c], (*want[j])[c], sizeof(S) == 4 ? 1e-5 : 1e-12), "bn_finalize_cuda",
                got[j * C + c], (*want[j])[c]);
    if (rep == 0) first = got;
    else if (std::memcmp(first.data(), got.data(), got.size() * sizeof(S)) != 0) f.check(false, "determinism", 0, 0);
    for (S* q : {dp, dg, db, drm, drv, dm, di, ds, dsh}) CUDA_OK(cudaFree(q));
  }
  return f.count;
}

int main() {
  int dev = 0;
  if (cudaGetDeviceCount(&dev) != cudaSuccess || dev == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;  // CTest SKIP_RETURN_CODE
  }
  Rng rng;
  int fails = 0, cases = 0;
  // H*W = 9 and C = 3, 13: scalar path; C = 8, 64 (NHWC) or H*W = 16 (NCHW): 16-byte vectors
  for (auto layout : {Layout::NCHW, Layout::NHWC})
    for (int64_t HW : {9, 16})
      for (int64_t C : {3, 8, 13, 64})
        for (int mode = 0; mode < 4; ++mode)
          for (bool relu : {true, false}) {
            fails += run<float, float>(2, C, HW, layout, mode, relu, 1e-5, rng) != 0;
            fails += run<double, double>(2, C, HW, layout, mode, relu, 1e-12, rng) != 0;
            fails += run<__half, float>(3, C, HW, layout, mode, relu, 2e-3, rng) != 0;
            fails += run<__nv_bfloat16, float>(3, C, HW, layout, mode, relu, 1.6e-2, rng) != 0;
            cases += 4;
          }
  for (int64_t C : {1, 7, 300}) {
    fails += run_finalize<float>(C, rng) != 0;
    fails += run_finalize<double>(C, rng) != 0;
    cases += 2;
  }
  std::printf("test_bn_cuda: %d passed, %d failed\n", cases - fails, fails);
  return fails == 0 ? 0 : 1;
}
