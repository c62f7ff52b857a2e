// CPU kernels vs the host reference: float/double/half/bfloat16 storage, both layouts,
// odd channel counts, every residual mode, ReLU on and off, NaN propagation, split row
// ranges, and bn_finalize vs a two-pass double computation (uneven and empty tiles).
#include <cmath>
#include <cstdio>
#include <limits>

#include "bn_cpu.h"
#include "reference.h"

using namespace fusedres;
using namespace fusedres_test;

template <typename T>
static T to_t(double v) {
  return static_cast<T>(v);
}
template <>
Half to_t<Half>(double v) {
  return half_from_float(static_cast<float>(v));
}
template <>
BFloat16 to_t<BFloat16>(double v) {
  return bfloat16_from_float(static_cast<float>(v));
}
template <typename T>
static double to_d(T v) {
  return static_cast<double>(v);
}
template <>
double to_d<Half>(Half v) {
  return to_float(v);
}
template <>
double to_d<BFloat16>(BFloat16 v) {
  return to_float(v);
}

// mode: 0 no residual, 1 residual, 2 dual (residual affine), 3 dual + sample_scale,
// 4 residual + sample_scale
template <typename T, typename S>
static int run_bn_add_act(int64_t N, int64_t C, int64_t HW, Layout layout, int mode, bool relu, double tol,
                          Rng& rng) {
  const int64_t total = N * C * HW;
  auto yd = rng.normal(total), rd = rng.normal(total);
  // a few special values in y: NaN must survive the ReLU, +-inf pass through the affine
  if (total > 5) {
    yd[1] = std::numeric_limits<double>::quiet_NaN();
    yd[total - 2] = std::numeric_limits<double>::infinity();
  }
  std::vector<T> y(total), r(total), out(total);
  for (int64_t i = 0; i < total; ++i) {
    y[i] = to_t<T>(yd[i]);
    r[i] = to_t<T>(rd[i]);
  }
  auto s = rng.normal(C, 1.0, 0.5), t = rng.normal(C), rs = rng.normal(C), rt = rng.normal(C), k = rng.normal(N);
  // coefficients as the kernel sees them (rounded to S), then widened for the reference
  std::vector<S> sS(s.begin(), s.end()), tS(t.begin(), t.end()), rsS(rs.begin(), rs.end()), rtS(rt.begin(), rt.end()),
      kS(k.begin(), k.end());
  std::vector<double> sd(sS.begin(), sS.end()), td(tS.begin(), tS.end()), rsd(rsS.begin(), rsS.end()),
      rtd(rtS.begin(), rtS.end()), kd(kS.begin(), kS.end());
  const bool has_r = mode >= 1, dual = mode == 2 || mode == 3, sample = mode >= 3;
  BnAddActParams<S> p;
  p.n = N;
  p.c = C;
  p.hw = HW;
  p.layout = layout;
  p.scale = sS.data();
  p.shift = tS.data();
  p.res_scale = dual ? rsS.data() : nullptr;
  p.res_shift = dual ? rtS.data() : nullptr;
  p.sample_scale = sample ? kS.data() : nullptr;
  p.relu = relu;
  const int64_t rows = bn_add_act_rows(N, C, HW, layout);
  // uneven ranges, as a parallel caller may split the work
  const int64_t cut1 = rows / 3, cut2 = rows / 3 + rows / 2;
  bn_add_act_cpu<T, S>(y.data(), has_r ? r.data() : nullptr, out.data(), p, 0, cut1);
  bn_add_act_cpu<T, S>(y.data(), has_r ? r.data() : nullptr, out.data(), p, cut1, cut2);
  bn_add_act_cpu<T, S>(y.data(), has_r ? r.data() : nullptr, out.data(), p, cut2, rows);
  Failures f;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < HW; ++i) {
        const int64_t o = offset(layout, n, c, i, C, HW);
        const double want = ref_bn_add_act(to_d(y[o]), to_d(r[o]), has_r, c, n, sd, td, dual ? &rsd : nullptr,
                                           dual ? &rtd : nullptr, sample ? &kd : nullptr, relu);
        f.check(close(to_d(out[o]), want, tol), "bn_add_act", to_d(out[o]), want);
      }
  if (f.count)
    std::printf("  in bn_add_act<%zu-byte> N=%lld C=%lld HW=%lld %s mode=%d relu=%d\n", sizeof(T), (long long)N,
                (long long)C, (long long)HW, layout == Layout::NHWC ? "NHWC" : "NCHW", mode, int(relu));
  return f.count;
}

template <typename S>
static int run_finalize(int64_t C, const std::vector<int64_t>& tiles, bool running, Rng& rng) {
  int64_t M = 0;
  for (auto n : tiles) M += n;
  auto data = rng.normal(M * C, 3.0, 2.0);  // [M, C]
  std::vector<S> partials(tiles.size() * 3 * C, S(0));
  int64_t start = 0;
  for (size_t t = 0; t < tiles.size(); ++t) {
    for (int64_t c = 0; c < C; ++c) {
      double mean = 0, m2 = 0;
      for (int64_t j = 0; j < tiles[t]; ++j) mean += data[(start + j) * C + c];
      if (tiles[t]) mean /= double(tiles[t]);
      for (int64_t j = 0; j < tiles[t]; ++j) {
        const double d = data[(start + j) * C + c] - mean;
        m2 += d * d;
      }
      partials[(t * 3 + 0) * C + c] = S(tiles[t]);
      partials[(t * 3 + 1) * C + c] = S(mean);
      partials[(t * 3 + 2) * C + c] = S(m2);
    }
    start += tiles[t];
  }
  auto g = rng.normal(C, 1.0, 0.2), b = rng.normal(C);
  std::vector<S> gamma(g.begin(), g.end()), beta(b.begin(), b.end()), rm(C, S(0.5)), rv(C, S(2)), mean(C), invstd(C),
      scale(C), shift(C);
  BnFinalizeParams<S> p;
  p.tiles = int64_t(tiles.size());
  p.c = C;
  p.partials = partials.data();
  p.gamma = gamma.data();
  p.beta = beta.data();
  p.running_mean = running ? rm.data() : nullptr;
  p.running_var = running ? rv.data() : nullptr;
  p.momentum = 0.3;
  p.eps = 1e-5;
  p.mean = mean.data();
  p.invstd = invstd.data();
  p.scale = scale.data();
  p.shift = shift.data();
  bn_finalize_cpu<S>(p, 0, C / 2);
  bn_finalize_cpu<S>(p, C / 2, C);
  Failures f;
  const double tol = sizeof(S) == 4 ? 2e-5 : 1e-11;
  const double least = partials_min_count_cpu<S>(partials.data(), p.tiles, C);
  f.check(least == double(M), "min count", least, double(M));
  for (int64_t c = 0; c < C; ++c) {
    // two-pass reference over all values of the channel
    double mu = 0, ss = 0;
    for (int64_t j = 0; j < M; ++j) mu += data[j * C + c];
    mu /= double(M);
    for (int64_t j = 0; j < M; ++j) ss += (data[j * C + c] - mu) * (data[j * C + c] - mu);
    const double inv = 1.0 / std::sqrt(ss / double(M) + 1e-5);
    const double sc = double(gamma[c]) * inv;
    f.check(close(mean[c], mu, tol), "mean", mean[c], mu);
    f.check(close(invstd[c], inv, tol), "invstd", invstd[c], inv);
    f.check(close(scale[c], sc, tol), "scale", scale[c], sc);
    f.check(close(shift[c], double(beta[c]) - mu * sc, tol), "shift", shift[c], double(beta[c]) - mu * sc);
    const double rmw = running ? 0.7 * 0.5 + 0.3 * mu : 0.5;
    const double rvw = running ? 0.7 * 2 + 0.3 * ss / double(M - 1) : 2.0;
    f.check(close(rm[c], rmw, tol), "running_mean", rm[c], rmw);
    f.check(close(rv[c], rvw, tol), "running_var", rv[c], rvw);
  }
  if (f.count) std::printf("  in bn_finalize<%zu-byte> C=%lld tiles=%zu\n", sizeof(S), (long long)C, tiles.size());
  return f.count;
}

// The 16-bit conversions: every 16-bit pattern survives a round trip through float, and
// float -> 16-bit rounds to nearest even (checked against the neighbours' midpoints).
static int run_conversions() {
  Failures f;
  for (uint32_t b = 0; b < 65536; ++b) {
    const Half h{static_cast<uint16_t>(b)};
    const float hv = to_float(h);
    if (hv == hv) f.check(half_from_float(hv).bits == h.bits, "half round trip", b, half_from_float(hv).bits);
    else f.check(std::isnan(to_float(half_from_float(hv))), "half NaN", b, 0);
    const BFloat16 z{static_cast<uint16_t>(b)};
    const float zv = to_float(z);
    if (zv == zv) f.check(bfloat16_from_float(zv).bits == z.bits, "bf16 round trip", b, bfloat16_from_float(zv).bits);
    else f.check(std::isnan(to_float(bfloat16_from_float(zv))), "bf16 NaN", b, 0);
  }
  // ties to even, subnormals, overflow
  const struct {
    float in;
    double want;
  } half_cases[] = {{1.0f + 1.0f / 2048, 1.0},             // tie -> even (1.0)
                    {1.0f + 3.0f / 2048, 1.0 + 2.0 / 1024},  // tie -> even (up)
                    {65504.0f, 65504.0},
                    {65519.0f, 65504.0},
                    {65520.0f, HUGE_VAL},
                    {5.9604645e-8f, 5.9604644775390625e-8},  // smallest subnormal
                    {2.9802322e-8f, 0.0},                    // half of it: tie -> 0
                    {-3.0e-5f, -2.9981136322021484e-05},
                    {1e-9f, 0.0}};
  for (const auto& c : half_cases) {
    const double got = to_float(half_from_float(c.in));
    f.check(got == c.want, "half rounding", got, c.want);
  }
  const struct {
    float in;
    double want;
  } bf16_cases[] = {{1.0f + 1.0f / 256, 1.0}, {1.0f + 3.0f / 256, 1.0 + 2.0 / 128}, {3.4e38f, HUGE_VAL}, {-2.5f, -2.5}};
  for (const auto& c : bf16_cases) {
    const double got = to_float(bfloat16_from_float(c.in));
    f.check(got == c.want, "bf16 rounding", got, c.want);
  }
  return f.count;
}

int main() {
  Rng rng;
  int fails = 0, cases = 0;
  fails += run_conversions() != 0;
  ++cases;
  for (auto layout : {Layout::NCHW, Layout::NHWC})
    for (int64_t C : {1, 3, 7, 13, 16})
      for (int mode = 0; mode < 5; ++mode)
        for (bool relu : {true, false}) {
          fails += run_bn_add_act<float, float>(2, C, 5, layout, mode, relu, 1e-5, rng) != 0;
          fails += run_bn_add_act<double, double>(3, C, 4, layout, mode, relu, 1e-12, rng) != 0;
          // 16-bit outputs: the reference is rounded once at the end, so allow one ulp
          fails += run_bn_add_act<Half, float>(1, C, 7, layout, mode, relu, 1e-3, rng) != 0;
          fails += run_bn_add_act<BFloat16, float>(2, C, 3, layout, mode, relu, 8e-3, rng) != 0;
          cases += 4;
        }
  for (int64_t C : {1, 3, 13}) {
    fails += run_finalize<float>(C, {40}, true, rng) != 0;
    fails += run_finalize<double>(C, {10, 0, 31, 1, 33}, true, rng) != 0;
    fails += run_finalize<float>(C, {7, 0, 7, 7, 7}, true, rng) != 0;
    fails += run_finalize<double>(C, {2, 5}, false, rng) != 0;
    cases += 4;
  }
  std::printf("test_bn_cpu: %d passed, %d failed\n", cases - fails, fails);
  return fails == 0 ? 0 : 1;
}
