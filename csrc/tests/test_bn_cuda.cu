// CUDA kernels vs the host reference (needs a GPU): fp32/fp64/fp16/bf16 storage, both
// layouts, vector and scalar paths (C multiple of the vector width or not), every
// residual mode, NaN propagation, and a deterministic finalize (two runs bitwise equal);
// batch_stats, the backward reduce/apply and act_grad vs the CPU kernels, with the
// reductions bitwise equal between the vector and scalar paths and across runs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

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

// Device copy of h at an element offset (offset 1 breaks 16-byte alignment: scalar path).
template <typename T>
static T* upload_at(const std::vector<T>& h, int offset) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, (h.size() + offset) * sizeof(T) + 16));
  CUDA_OK(cudaMemcpy(d + offset, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
static std::vector<T> download(const T* d, size_t n) {
  std::vector<T> h(n);
  CUDA_OK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// Host storage type of a device storage type (same bits), for the CPU kernels.
template <typename T>
struct HostT {
  using type = T;
};
template <>
struct HostT<__half> {
  using type = Half;
};
template <>
struct HostT<__nv_bfloat16> {
  using type = BFloat16;
};

template <typename T>
static std::vector<typename HostT<T>::type> as_host(const std::vector<T>& v) {
  std::vector<typename HostT<T>::type> h(v.size());
  if (!v.empty()) std::memcpy(h.data(), v.data(), v.size() * sizeof(T));
  return h;
}

// batch_stats on the GPU vs the CPU kernel (tested against double sums in test_bn_cpu),
// aligned (vector path where the shape allows) and misaligned (scalar path): the two GPU
// results must be bitwise equal, and equal again on a second run.
template <typename T, typename S>
static int run_batch_stats(int64_t N, int64_t C, int64_t HW, Layout layout, int64_t tiles, Rng& rng) {
  using H = typename HostT<T>::type;
  const int64_t total = N * C * HW;
  auto xd = rng.normal(total, 1.5, 2.0);
  std::vector<T> x(total);
  for (int64_t i = 0; i < total; ++i) x[i] = to_t<T>(xd[i]);
  BatchStatsParams<S> p;
  p.n = N;
  p.c = C;
  p.hw = HW;
  p.layout = layout;
  p.tiles = tiles;
  std::vector<S> want(tiles * 3 * C);
  {
    auto xh = as_host(x);
    p.partials = want.data();
    const CpuReduceGeom g = batch_stats_geom_cpu(N, C, HW, layout, tiles);
    std::vector<double> work(g.work);
    batch_stats_blocks_cpu<H, S>(xh.data(), p, work.data(), 0, g.items);
    batch_stats_merge_cpu<S>(p, work.data(), 0, C);
  }
  Failures f;
  std::vector<S> first;
  for (int run = 0; run < 3; ++run) {
    const int off = run == 1 ? 1 : 0;
    T* dx = upload_at(x, off);
    S* dp = upload(std::vector<S>(tiles * 3 * C));
    void* ws = nullptr;
    CUDA_OK(cudaMalloc(&ws, batch_stats_cuda_workspace<T, S>(p) + 16));
    BatchStatsParams<S> q = p;
    q.partials = dp;
    CUDA_OK((batch_stats_cuda<T, S>(dx + off, q, ws, nullptr)));
    CUDA_OK(cudaDeviceSynchronize());
    const auto got = download(dp, tiles * 3 * C);
    for (int64_t i = 0; i < tiles * 3 * C; ++i)
      f.check(close(got[i], want[i], sizeof(S) == 4 ? 2e-6 : 1e-12), "batch_stats_cuda", got[i], want[i]);
    if (run == 0) first = got;
    else if (std::memcmp(first.data(), got.data(), got.size() * sizeof(S)) != 0)
      f.check(false, run == 1 ? "batch_stats vector vs scalar path bitwise" : "batch_stats determinism", 0, 0);
    for (void* q2 : {(void*)dx, (void*)dp, ws}) CUDA_OK(cudaFree(q2));
  }
  if (f.count)
    std::printf("  in batch_stats_cuda<%zu-byte> N=%lld C=%lld HW=%lld %s tiles=%lld\n", sizeof(T), (long long)N,
                (long long)C, (long long)HW, layout == Layout::NHWC ? "NHWC" : "NCHW", (long long)tiles);
  return f.count;
}

// bn_backward_reduce / apply and act_grad on the GPU vs the CPU kernels; the reduce bitwise
// equal between the vector and scalar paths and across runs.
template <typename T, typename S>
static int run_backward(int64_t N, int64_t C, int64_t HW, Layout layout, int flags, Rng& rng) {
  using H = typename HostT<T>::type;
  const bool relu = flags & 1, has_out = flags & 2, sample = flags & 4;
  const int64_t total = N * C * HW;
  auto dd = rng.normal(total), yd = rng.normal(total, 0.2, 1.3), od = rng.normal(total);
  std::vector<T> dout(total), y(total), out(total);
  for (int64_t i = 0; i < total; ++i) {
    dout[i] = to_t<T>(dd[i]);
    y[i] = to_t<T>(yd[i]);
    out[i] = to_t<T>(i % 5 == 2 ? 0.0 : od[i]);
  }
  auto mu = rng.normal(C, 0.2, 0.1), iv = rng.normal(C, 1.0, 0.1), sc = rng.normal(C, 1.0, 0.5), sh = rng.normal(C),
       k = rng.normal(N);
  std::vector<S> muS(mu.begin(), mu.end()), ivS(iv.begin(), iv.end()), scS(sc.begin(), sc.end()),
      shS(sh.begin(), sh.end()), kS(k.begin(), k.end());
  BnBackwardParams<S> p;
  p.n = N;
  p.c = C;
  p.hw = HW;
  p.layout = layout;
  p.mean = muS.data();
  p.invstd = ivS.data();
  p.scale = scS.data();
  p.shift = shS.data();
  p.sample_scale = sample ? kS.data() : nullptr;
  p.relu = relu;
  // CPU results
  std::vector<S> sg(C), sgx(C), coefs(3 * C);
  std::vector<H> dy_cpu(total), dx_cpu(total), dy_add_cpu(total), g_cpu(total);
  {
    auto dh = as_host(dout), yh = as_host(y), oh = as_host(out);
    BnBackwardParams<S> q = p;
    q.sum_g = sg.data();
    q.sum_gx = sgx.data();
    const CpuReduceGeom g = bn_backward_reduce_geom_cpu(N, C, HW, layout);
    std::vector<double> work(g.work);
    bn_backward_reduce_blocks_cpu<H, S>(dh.data(), yh.data(), has_out ? oh.data() : nullptr, q, work.data(), 0,
                                        g.items);
    bn_backward_reduce_merge_cpu<S>(q, work.data(), 0, C);
    bn_backward_coefs_cpu<S>(q, sg.data(), sgx.data(), coefs.data());
    q.coefs = coefs.data();
    const H* o = has_out ? oh.data() : nullptr;
    const int64_t rows = bn_add_act_rows(N, C, HW, layout);
    bn_backward_apply_cpu<H, S>(dh.data(), yh.data(), o, nullptr, nullptr, dy_cpu.data(), q, 0, rows);
    // with an addend (out's values: a pre-activation block's shortcut gradient) and the masked
    // gradient stored (a post-activation block's identity-shortcut gradient)
    bn_backward_apply_cpu<H, S>(dh.data(), yh.data(), o, oh.data(), g_cpu.data(), dy_add_cpu.data(), q, 0, rows);
    act_grad_cpu<H>(dh.data(), oh.data(), dx_cpu.data(), 0, total);
  }
  Failures f;
  const double tol = sizeof(S) == 4 ? 2e-5 : 1e-11;
  const double out_tol = std::is_same<T, __nv_bfloat16>::value ? 1.6e-2 : std::is_same<T, __half>::value ? 2e-3 : tol;
  std::vector<S> first;
  for (int run = 0; run < 3; ++run) {
    const int off = run == 1 ? 1 : 0;
    T *dd_ = upload_at(dout, off), *dy_ = upload_at(y, off), *do_ = upload_at(out, off);
    T *dres = upload_at(std::vector<T>(total), off), *dxg = upload_at(std::vector<T>(total), off);
    T *dres_add = upload_at(std::vector<T>(total), off), *dg = upload_at(std::vector<T>(total), off);
    S *dmu = upload(muS), *div = upload(ivS), *dsc = upload(scS), *dsh = upload(shS), *dk = upload(kS);
    S *dsg = upload(std::vector<S>(C)), *dsgx = upload(std::vector<S>(C)), *dco = upload(std::vector<S>(3 * C));
    BnBackwardParams<S> q = p;
    q.mean = dmu;
    q.invstd = div;
    q.scale = dsc;
    q.shift = dsh;
    q.sample_scale = sample ? dk : nullptr;
    q.sum_g = dsg;
    q.sum_gx = dsgx;
    void* ws = nullptr;
    CUDA_OK(cudaMalloc(&ws, bn_backward_reduce_cuda_workspace<T, S>(q) + 16));
    const T* o = has_out ? do_ + off : nullptr;
    CUDA_OK((bn_backward_reduce_cuda<T, S>(dd_ + off, dy_ + off, o, q, ws, nullptr)));
    CUDA_OK(bn_backward_coefs_cuda<S>(q, dsg, dsgx, dco, nullptr));
    q.coefs = dco;
    CUDA_OK((bn_backward_apply_cuda<T, S>(dd_ + off, dy_ + off, o, nullptr, nullptr, dres + off, q, nullptr)));
    CUDA_OK((bn_backward_apply_cuda<T, S>(dd_ + off, dy_ + off, o, do_ + off, dg + off, dres_add + off, q, nullptr)));
    CUDA_OK(act_grad_cuda<T>(dd_ + off, do_ + off, dxg + off, total, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<S> sums = download(dsg, C), sx = download(dsgx, C);
    sums.insert(sums.end(), sx.begin(), sx.end());
    for (int64_t c = 0; c < C; ++c) {
      f.check(close(sums[c], sg[c], tol * 10), "sum_g cuda", sums[c], sg[c]);
      f.check(close(sums[C + c], sgx[c], tol * 10), "sum_gx cuda", sums[C + c], sgx[c]);
    }
    const auto dy_gpu = download(dres + off, total), dx_gpu = download(dxg + off, total);
    const auto dy_add_gpu = download(dres_add + off, total), g_gpu = download(dg + off, total);
    for (int64_t i = 0; i < total; ++i) {
      const double a = to_d(dy_gpu[i]), b = to_d(reinterpret_cast<const T*>(dy_cpu.data())[i]);
      f.check(close(a, b, out_tol * 10), "dy cuda", a, b);
      const double aa = to_d(dy_add_gpu[i]), ba = to_d(reinterpret_cast<const T*>(dy_add_cpu.data())[i]);
      f.check(close(aa, ba, out_tol * 10), "dy + addend cuda", aa, ba);
      f.check(std::memcmp(&g_gpu[i], &g_cpu[i], sizeof(T)) == 0, "grad_out cuda", to_d(g_gpu[i]),
              to_d(reinterpret_cast<const T*>(g_cpu.data())[i]));
      f.check(std::memcmp(&dx_gpu[i], &dx_cpu[i], sizeof(T)) == 0, "act_grad cuda", to_d(dx_gpu[i]),
              to_d(reinterpret_cast<const T*>(dx_cpu.data())[i]));
    }
    if (run == 0) first = sums;
    else if (std::memcmp(first.data(), sums.data(), sums.size() * sizeof(S)) != 0)
      f.check(false, run == 1 ? "reduce vector vs scalar path bitwise" : "reduce determinism", 0, 0);
    for (void* q2 : {(void*)dd_, (void*)dy_, (void*)do_, (void*)dres, (void*)dres_add, (void*)dg, (void*)dxg,
                     (void*)dmu, (void*)div, (void*)dsc, (void*)dsh, (void*)dk, (void*)dsg, (void*)dsgx, (void*)dco, ws})
      CUDA_OK(cudaFree(q2));
  }
  if (f.count)
    std::printf("  in bn_backward_cuda<%zu-byte> N=%lld C=%lld HW=%lld %s flags=%d\n", sizeof(T), (long long)N,
                (long long)C, (long long)HW, layout == Layout::NHWC ? "NHWC" : "NCHW", flags);
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
  // C = 8, 64 (NHWC) or H*W = 16, 64 (NCHW): 16-byte vectors when aligned; C = 3, 13 and
  // H*W = 9: scalar only. Big shapes give several blocks per tile / channel.
  for (auto layout : {Layout::NCHW, Layout::NHWC}) {
    for (int64_t C : {3, 8, 13, 64})
      for (int64_t HW : {9, 16}) {
        for (int64_t tiles : {1, 4, 50}) {
          fails += run_batch_stats<float, float>(3, C, HW, layout, tiles, rng) != 0;
          fails += run_batch_stats<double, double>(2, C, HW, layout, tiles, rng) != 0;
          fails += run_batch_stats<__half, float>(3, C, HW, layout, tiles, rng) != 0;
          fails += run_batch_stats<__nv_bfloat16, float>(1, C, HW, layout, tiles, rng) != 0;
          cases += 4;
        }
        for (int flags = 0; flags < 8; ++flags) {
          fails += run_backward<float, float>(3, C, HW, layout, flags, rng) != 0;
          fails += run_backward<double, double>(2, C, HW, layout, flags, rng) != 0;
          fails += run_backward<__half, float>(3, C, HW, layout, flags, rng) != 0;
          fails += run_backward<__nv_bfloat16, float>(1, C, HW, layout, flags, rng) != 0;
          cases += 4;
        }
      }
    fails += run_batch_stats<float, float>(4, 24, 3136, layout, 1, rng) != 0;
    fails += run_batch_stats<__nv_bfloat16, float>(2, 256, 196, layout, 1, rng) != 0;
    fails += run_batch_stats<float, float>(3, 5, 4096, layout, 6, rng) != 0;
    fails += run_batch_stats<float, float>(0, 5, 16, layout, 1, rng) != 0;
    fails += run_backward<float, float>(4, 24, 3136, layout, 7, rng) != 0;
    fails += run_backward<__half, float>(2, 256, 196, layout, 5, rng) != 0;
    cases += 6;
  }
  std::printf("test_bn_cuda: %d passed, %d failed\n", cases - fails, fails);
  return fails == 0 ? 0 : 1;
}
