// CPU kernels vs the host reference: float/double/half/bfloat16 storage, both layouts,
// odd channel counts, every residual mode, ReLU on and off, NaN propagation, split row
// ranges, bn_finalize vs a two-pass double computation (uneven and empty tiles),
// batch_stats per tile, the backward reduce/apply with every mask and sample-scale
// variant, act_grad, and div_by_count (the GPU batch_stats' division-free x / count) bit
// for bit against IEEE float division.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>

#include "bn_cpu.h"
#include "chan_merge.h"
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

// batch_stats vs a two-pass double computation per tile, the work split unevenly as a
// parallel caller may split it; shapes that give several blocks per tile and empty tiles.
template <typename T, typename S>
static int run_batch_stats(int64_t N, int64_t C, int64_t HW, Layout layout, int64_t tiles, Rng& rng) {
  const int64_t total = N * C * HW, M = N * HW;
  auto xd = rng.normal(total, 2.0, 3.0);
  std::vector<T> x(total);
  for (int64_t i = 0; i < total; ++i) x[i] = to_t<T>(xd[i]);
  std::vector<S> partials(tiles * 3 * C, S(-7));
  BatchStatsParams<S> p;
  p.n = N;
  p.c = C;
  p.hw = HW;
  p.layout = layout;
  p.tiles = tiles;
  p.partials = partials.data();
  const CpuReduceGeom g = batch_stats_geom_cpu(N, C, HW, layout, tiles);
  std::vector<double> work(g.work, -1.0);
  const int64_t cut = g.items / 3;
  batch_stats_blocks_cpu<T, S>(x.data(), p, work.data(), cut, g.items);
  batch_stats_blocks_cpu<T, S>(x.data(), p, work.data(), 0, cut);
  batch_stats_merge_cpu<S>(p, work.data(), C / 2, C);
  batch_stats_merge_cpu<S>(p, work.data(), 0, C / 2);
  Failures f;
  const double tol = sizeof(S) == 4 ? 2e-6 : 1e-12;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t b = stats_tile_begin(M, tiles, t), e = stats_tile_begin(M, tiles, t + 1);
    for (int64_t c = 0; c < C; ++c) {
      double mu = 0, ss = 0;
      for (int64_t m = b; m < e; ++m) mu += to_d(x[offset(layout, m / HW, c, m % HW, C, HW)]);
      mu /= double(e - b);
      for (int64_t m = b; m < e; ++m) {
        const double d = to_d(x[offset(layout, m / HW, c, m % HW, C, HW)]) - mu;
        ss += d * d;
      }
      const S* pt = partials.data() + t * 3 * C;
      f.check(double(pt[c]) == double(e - b), "batch_stats count", pt[c], double(e - b));
      if (e > b) {
        f.check(close(pt[C + c], mu, tol * 4), "batch_stats mean", pt[C + c], mu);
        f.check(close(pt[2 * C + c], ss, tol), "batch_stats M2", pt[2 * C + c], ss);
      } else {
        f.check(std::isnan(double(pt[C + c])) && pt[2 * C + c] == S(0), "batch_stats empty tile", pt[C + c], NAN);
      }
    }
  }
  if (f.count)
    std::printf("  in batch_stats<%zu-byte> N=%lld C=%lld HW=%lld %s tiles=%lld\n", sizeof(T), (long long)N,
                (long long)C, (long long)HW, layout == Layout::NHWC ? "NHWC" : "NCHW", (long long)tiles);
  return f.count;
}

// bn_backward_reduce and bn_backward_apply vs double sums. The ReLU mask is recomputed the
// way the kernel does (in S, two roundings), the rest is in double.
template <typename T, typename S>
static int run_backward(int64_t N, int64_t C, int64_t HW, Layout layout, bool relu, bool has_out, bool sample,
                        Rng& rng) {
  const int64_t total = N * C * HW, M = N * HW;
  auto dd = rng.normal(total), yd = rng.normal(total, 0.3, 1.5), od = rng.normal(total);
  std::vector<T> dout(total), y(total), out(total), dy(total);
  for (int64_t i = 0; i < total; ++i) {
    dout[i] = to_t<T>(dd[i]);
    y[i] = to_t<T>(yd[i]);
    out[i] = to_t<T>(i % 7 == 3 ? 0.0 : od[i]);  // exact zeros: dropped like threshold_backward
  }
  auto mu = rng.normal(C, 0.3, 0.2), iv = rng.normal(C, 1.0, 0.1), sc = rng.normal(C, 1.0, 0.5),
       sh = rng.normal(C), k = rng.normal(N);
  std::vector<S> muS(mu.begin(), mu.end()), ivS(iv.begin(), iv.end()), scS(sc.begin(), sc.end()),
      shS(sh.begin(), sh.end()), kS(k.begin(), k.end()), sg(C), sgx(C), coefs(3 * C);
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
  p.sum_g = sg.data();
  p.sum_gx = sgx.data();
  const T* o = has_out ? out.data() : nullptr;
  const CpuReduceGeom g = bn_backward_reduce_geom_cpu(N, C, HW, layout);
  std::vector<double> work(g.work, -1.0);
  const int64_t cut = (g.items + 1) / 2;
  bn_backward_reduce_blocks_cpu<T, S>(dout.data(), y.data(), o, p, work.data(), cut, g.items);
  bn_backward_reduce_blocks_cpu<T, S>(dout.data(), y.data(), o, p, work.data(), 0, cut);
  bn_backward_reduce_merge_cpu<S>(p, work.data(), 0, C);
  bn_backward_coefs_cpu<S>(p, sg.data(), sgx.data(), coefs.data());
  p.coefs = coefs.data();
  const int64_t rows = bn_add_act_rows(N, C, HW, layout);
  bn_backward_apply_cpu<T, S>(dout.data(), y.data(), o, nullptr, nullptr, dy.data(), p, rows / 2, rows);
  bn_backward_apply_cpu<T, S>(dout.data(), y.data(), o, nullptr, nullptr, dy.data(), p, 0, rows / 2);
  // the same apply plus an addend (a pre-activation block's shortcut gradient)
  auto addd = rng.normal(total);
  std::vector<T> addend(total), dy_add(total), g_out(total);
  for (int64_t i = 0; i < total; ++i) addend[i] = to_t<T>(addd[i]);
  // ... and storing the masked gradient before the sample scale (act_grad's output when out is given)
  bn_backward_apply_cpu<T, S>(dout.data(), y.data(), o, addend.data(), g_out.data(), dy_add.data(), p, 0, rows);
  Failures f;
  const double tol = sizeof(S) == 4 ? 2e-6 : 1e-12;
  std::vector<double> gref(total), gmask(total);
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0, mag_a = 0, mag_b = 0;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t n = m / HW, i = offset(layout, n, c, m % HW, C, HW);
      double gv = to_d(dout[i]);
      if (relu) {
        const S z = has_out ? S(to_d(out[i])) : S(to_d(y[i])) * scS[c] + shS[c];
        if (z <= S(0)) gv = 0.0;
      }
      gmask[i] = gv;
      if (sample) gv *= double(kS[n]);
      gref[i] = gv;
      const double gx = gv * ((to_d(y[i]) - double(muS[c])) * double(ivS[c]));
      a += gv;
      b += gx;
      mag_a += std::fabs(gv);
      mag_b += std::fabs(gx);
    }
    f.check(std::fabs(sg[c] - a) <= tol * (1 + mag_a), "sum_g", sg[c], a);
    f.check(std::fabs(sgx[c] - b) <= tol * (1 + mag_b), "sum_gx", sgx[c], b);
    // apply, from the kernel's own sums (the coefficients are checked against the formula)
    const double A = scS[c], B = -double(scS[c]) * ivS[c] * double(sgx[c]) / double(M);
    const double Cc = -A * double(sg[c]) / double(M) - B * muS[c];
    f.check(close(coefs[c], A, tol) && close(coefs[C + c], B, tol * 4) && close(coefs[2 * C + c], Cc, tol * 4),
            "coefs", coefs[2 * C + c], Cc);
    const double out_tol = sizeof(T) == 2 ? (std::is_same<T, Half>::value ? 1e-3 : 8e-3) : tol * 4;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t i = offset(layout, m / HW, c, m % HW, C, HW);
      const double want = A * gref[i] + B * to_d(y[i]) + Cc;
      const double mag = std::fabs(A * gref[i]) + std::fabs(B * to_d(y[i])) + std::fabs(Cc);
      // plus half a float16 subnormal step: tiny results are absolute-rounded there
      const double sub = std::is_same<T, Half>::value ? 3e-8 : 0.0;
      f.check(std::fabs(to_d(dy[i]) - want) <= out_tol * (mag + 1e-30) + sub, "dy", to_d(dy[i]), want);
      f.check(to_d(g_out[i]) == gmask[i], "grad_out", to_d(g_out[i]), gmask[i]);  // dout or 0: exact
      const double want_add = want + to_d(addend[i]), mag_add = mag + std::fabs(to_d(addend[i]));
      f.check(std::fabs(to_d(dy_add[i]) - want_add) <= out_tol * (mag_add + 1e-30) + sub, "dy + addend",
              to_d(dy_add[i]), want_add);
      // stored in S itself, dy + addend is the one rounding of the unrounded sum
      if (std::is_same<T, S>::value) {
        const S sum = static_cast<S>(to_d(dy[i])) + static_cast<S>(to_d(addend[i]));
        f.check(to_d(dy_add[i]) == double(sum), "dy + addend, exact", to_d(dy_add[i]), double(sum));
      }
    }
  }
  if (f.count)
    std::printf("  in bn_backward<%zu-byte> N=%lld C=%lld HW=%lld %s relu=%d out=%d sample=%d\n", sizeof(T),
                (long long)N, (long long)C, (long long)HW, layout == Layout::NHWC ? "NHWC" : "NCHW", int(relu),
                int(has_out), int(sample));
  return f.count;
}

// NaN and Inf: a NaN gradient poisons only its channel's sums; a NaN ReLU input keeps the
// gradient (threshold_backward); an Inf y under a dropped gradient still gives 0*Inf = NaN
// in sum g*xhat, as the reference's g * xhat does.
static int run_backward_specials() {
  const int64_t N = 2, C = 3, HW = 4, total = N * C * HW;
  std::vector<float> dout(total, 1.0f), y(total, 0.5f), out(total, 1.0f), dy(total);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  dout[offset(Layout::NCHW, 1, 0, 2, C, HW)] = nan;  // channel 0
  out[offset(Layout::NCHW, 0, 1, 1, C, HW)] = nan;   // channel 1: mask keeps dout
  y[offset(Layout::NCHW, 1, 2, 3, C, HW)] = inf;     // channel 2, gradient dropped below
  out[offset(Layout::NCHW, 1, 2, 3, C, HW)] = 0.0f;
  std::vector<float> mean(C, 0.5f), inv(C, 2.0f), sc(C, 1.0f), sh(C, 0.0f), sg(C), sgx(C), coefs(3 * C);
  BnBackwardParams<float> p;
  p.n = N;
  p.c = C;
  p.hw = HW;
  p.mean = mean.data();
  p.invstd = inv.data();
  p.scale = sc.data();
  p.shift = sh.data();
  p.relu = true;
  p.sum_g = sg.data();
  p.sum_gx = sgx.data();
  const CpuReduceGeom g = bn_backward_reduce_geom_cpu(N, C, HW, Layout::NCHW);
  std::vector<double> work(g.work);
  bn_backward_reduce_blocks_cpu<float, float>(dout.data(), y.data(), out.data(), p, work.data(), 0, g.items);
  bn_backward_reduce_merge_cpu<float>(p, work.data(), 0, C);
  Failures f;
  f.check(std::isnan(sg[0]) && std::isnan(sgx[0]), "NaN dout poisons its channel", sg[0], nan);
  f.check(sg[1] == float(N * HW) && sgx[1] == 0.0f, "NaN out keeps dout", sg[1], double(N * HW));
  f.check(sg[2] == float(N * HW - 1) && std::isnan(sgx[2]), "0 * Inf xhat is NaN", sgx[2], nan);
  // act_grad: out <= 0 (and -0) drops, NaN out keeps
  const float o4[5] = {-1.0f, -0.0f, 0.0f, nan, 2.0f}, d4[5] = {1, 2, 3, 4, 5};
  float r4[5];
  act_grad_cpu<float>(d4, o4, r4, 0, 5);
  f.check(r4[0] == 0 && r4[1] == 0 && r4[2] == 0 && r4[3] == 4 && r4[4] == 5, "act_grad", r4[3], 4);
  const Half h_out[3] = {half_from_float(-0.5f), half_from_float(nan), half_from_float(3.0f)};
  const Half h_d[3] = {half_from_float(7.0f), half_from_float(8.0f), half_from_float(9.0f)};
  Half h_r[3];
  act_grad_cpu<Half>(h_d, h_out, h_r, 0, 3);
  f.check(h_r[0].bits == 0 && to_float(h_r[1]) == 8.0f && to_float(h_r[2]) == 9.0f, "act_grad half", to_float(h_r[1]),
          8.0);
  return f.count;
}

static uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}
static float float_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// div_by_count(x, c, 1/c) must equal x / float(c) bit for bit (NaN: any NaN) for every
// positive integer c below 2^24: random bit patterns (subnormals, huge values, zeros of both
// signs, infinities), subnormal quotients that are exact midpoints, and dividends whose
// quotient lies within a few units of the last place of a midpoint between two floats.
static int run_div_by_count() {
  Failures f;
  std::mt19937_64 g(99);
  auto one = [&](float x, int64_t c) {
    const float want = x / static_cast<float>(c);
    const float got = div_by_count(x, static_cast<double>(c), 1.0 / static_cast<double>(c));
    const bool ok = std::isnan(want) ? std::isnan(got) : bits_of(got) == bits_of(want);
    f.check(ok, "div_by_count", got, want);
  };
  auto near_midpoint = [&](int64_t c) {
    // a float y, the midpoint m of y and its successor, and x = c*m rounded to float
    const float y = float_of(static_cast<uint32_t>(g() % 0x7f000000u));
    const double m = (static_cast<double>(y) + static_cast<double>(std::nextafter(y, INFINITY))) / 2.0;
    float x = static_cast<float>(static_cast<double>(c) * m);
    for (int k = 0; k < 3; ++k) {
      one(x, c);
      one(-x, c);
      x = std::nextafter(x, INFINITY);
    }
  };
  const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1.0f, -1.0f, 3.0f,
                            std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::min(), -std::numeric_limits<float>::max()};
  for (int64_t c = 1; c <= 20000; ++c) {
    for (float x : specials) one(x, c);
    for (int k = 0; k < 24; ++k) one(float_of(static_cast<uint32_t>(g())), c);
    for (int k = 0; k < 8; ++k) near_midpoint(c);
    // subnormal quotients that are exact midpoints: A * 2^-149 / c = (2B+1)/2 * 2^-149 for an
    // even c and A = c/2 * (2B+1) below 2^23
    if (c % 2 == 0) {
      const uint64_t half = static_cast<uint64_t>(c / 2), most = ((1u << 23) / half - 1) / 2;
      for (int k = 0; k < 8; ++k) {
        const uint64_t b = most > 0 ? g() % most : 0, a = half * (2 * b + 1);
        if (a < (1u << 23)) {
          one(float_of(static_cast<uint32_t>(a)), c);
          one(-float_of(static_cast<uint32_t>(a)), c);
        }
      }
    }
  }
  for (int k = 0; k < 200000; ++k) {
    const int64_t c = 1 + static_cast<int64_t>(g() % ((1u << 24) - 1));
    one(float_of(static_cast<uint32_t>(g())), c);
    near_midpoint(c);
  }
  return f.count;
}

int main() {
  Rng rng;
  int fails = 0, cases = 0;
  fails += run_conversions() != 0;
  fails += run_div_by_count() != 0;
  cases += 2;
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
  for (auto layout : {Layout::NCHW, Layout::NHWC}) {
    // one tile (the reference layout); several blocks per tile (NCHW blocks are 32768 pixels,
    // NHWC blocks max(64, 32768/C) pixels); uneven, single-row and empty tiles
    for (int64_t tiles : {int64_t(1), int64_t(5), int64_t(45)}) {
      fails += run_batch_stats<float, float>(3, 7, 15, layout, tiles, rng) != 0;
      fails += run_batch_stats<double, double>(1, 5, 9, layout, tiles, rng) != 0;
      fails += run_batch_stats<Half, float>(3, 13, 7, layout, tiles, rng) != 0;
      fails += run_batch_stats<BFloat16, float>(2, 3, 11, layout, tiles, rng) != 0;
      cases += 4;
    }
    fails += run_batch_stats<float, float>(3, 2, 11001, layout, 1, rng) != 0;
    fails += run_batch_stats<float, float>(3, 7, 2003, layout, 2, rng) != 0;
    fails += run_batch_stats<double, double>(2, 1, 20000, layout, 1, rng) != 0;
    fails += run_batch_stats<float, float>(0, 3, 5, layout, 1, rng) != 0;  // empty batch: (0, NaN, 0)
    fails += run_batch_stats<float, float>(2, 600, 100, layout, 3, rng) != 0;  // wide: 64-pixel NHWC blocks
    cases += 5;
    for (int64_t C : {1, 3, 13})
      for (int flags = 0; flags < 8; ++flags) {
        const bool relu = flags & 1, has_out = flags & 2, sample = flags & 4;
        fails += run_backward<float, float>(3, C, 10, layout, relu, has_out, sample, rng) != 0;
        fails += run_backward<double, double>(1, C, 9, layout, relu, has_out, sample, rng) != 0;
        fails += run_backward<Half, float>(2, C, 5, layout, relu, has_out, sample, rng) != 0;
        fails += run_backward<BFloat16, float>(3, C, 3, layout, relu, has_out, sample, rng) != 0;
        cases += 4;
      }
    // several reduce blocks per channel
    fails += run_backward<float, float>(2, 3, 17000, layout, true, false, true, rng) != 0;
    fails += run_backward<float, float>(3, 9, 3001, layout, true, true, false, rng) != 0;
    fails += run_backward<float, float>(2, 600, 100, layout, true, false, true, rng) != 0;
    cases += 3;
  }
  fails += run_backward_specials() != 0;
  ++cases;
  std::printf("test_bn_cpu: %d passed, %d failed\n", cases - fails, fails);
  return fails == 0 ? 0 : 1;
}
