// CPU kernels vs the host reference: both layouts, odd channel counts, every residual mode.
#include <cstdio>

#include "bn_kernels.h"
#include "reference.h"

using namespace fusedres;
using namespace fusedres_test;

template <typename T>
static int run_bn_add_act(int64_t N, int64_t C, int64_t HW, Layout layout, int mode, bool relu, Rng& rng) {
  const int64_t total = N * C * HW;
  auto yd = rng.normal(total), rd = rng.normal(total), s = rng.normal(C), t = rng.normal(C), rs = rng.normal(C),
       rt = rng.normal(C), k = rng.normal(N);
  std::vector<T> y(yd.begin(), yd.end()), r(rd.begin(), rd.end()), out(total);
  std::vector<T> sT(s.begin(), s.end()), tT(t.begin(), t.end()), rsT(rs.begin(), rs.end()), rtT(rt.begin(), rt.end()),
      kT(k.begin(), k.end());
  const bool has_r = mode >= 1, dual = mode >= 2, sample = mode == 3;
  BnAddActParams<T> p;
  p.n = N;
  p.c = C;
  p.hw = HW;
  p.layout = layout;
  p.scale = sT.data();
  p.shift = tT.data();
  p.res_scale = dual ? rsT.data() : nullptr;
  p.res_shift = dual ? rtT.data() : nullptr;
  p.sample_scale = sample ? kT.data() : nullptr;
  p.relu = relu;
  const int64_t rows = bn_add_act_rows(N, C, HW, layout);
  // two ranges, as a parallel caller would split the work
  bn_add_act_cpu<T, T>(y.data(), has_r ? r.data() : nullptr, out.data(), p, 0, rows / 2);
  bn_add_act_cpu<T, T>(y.data(), has_r ? r.data() : nullptr, out.data(), p, rows / 2, rows);
  Failures f;
  const double tol = sizeof(T) == 4 ? 1e-5 : 1e-12;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < HW; ++i) {
        const int64_t o = offset(layout, n, c, i, C, HW);
        const double want = ref_bn_add_act(double(y[o]), double(r[o]), has_r, c, n, std::vector<double>(sT.begin(), sT.end()),
                                           std::vector<double>(tT.begin(), tT.end()), dual ? &rs : nullptr,
                                           dual ? &rt : nullptr, sample ? &k : nullptr, relu);
        f.check(close(double(out[o]), want, tol), "bn_add_act", double(out[o]), want);
      }
  return f.count;
}

template <typename S>
static int run_finalize(int64_t C, const std::vector<int64_t>& tiles, Rng& rng) {
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
      for (int64_t j = 0; j < tiles[t]; ++j) m2 += (data[(start + j) * C + c] - mean) * (data[(start + j) * C + c] - mean);
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
  p.running_mean = rm.data();
  p.running_var = rv.data();
  p.momentum = 0.3;
  p.eps = 1e-5;
  p.mean = mean.data();
  p.invstd = invstd.data();
  p.scale = scale.data();
  p.shift = shift.data();
  bn_finalize_cpu<S>(p, 0, C);
  Failures f;
  const double tol = sizeof(S) == 4 ? 2e-5 : 1e-11;
  if (partials_count_cpu<S>(partials.data(), p.tiles, C) != double(M)) f.check(false, "count", 0, double(M));
  for (int64_t c = 0; c < C; ++c) {
    double mu = 0, var = 0;
    for (int64_t j = 0; j < M; ++j) mu += data[j * C + c];
    mu /= double(M);
    for (int64_t j = 0; j < M; ++j) var += (data[j * C + c] - mu) * (data[j * C + c] - mu);
    const double inv = 1.0 / std::sqrt(var / double(M) + 1e-5);
    f.check(close(mean[c], mu, tol), "mean", mean[c], mu);
    f.check(close(invstd[c], inv, tol), "invstd", invstd[c], inv);
    f.check(close(scale[c], double(gamma[c]) * inv, tol), "scale", scale[c], double(gamma[c]) * inv);
    f.check(close(shift[c], double(beta[c]) - mu * double(gamma[c]) * inv, tol), "shift", shift[c], 0);
    f.check(close(rm[c], 0.7 * 0.5 + 0.3 * mu, tol), "running_mean", rm[c], 0.7 * 0.5 + 0.3 * mu);
    const double rvw = 0.7 * 2 + 0.3 * var / double(M - 1);
    f.check(close(rv[c], rvw, tol), "running_var", rv[c], rvw);
  }
  return f.count;
}

int main() {
  Rng rng;
  int fails = 0, cases = 0;
  for (auto layout : {Layout::NCHW, Layout::NHWC})
    for (int64_t C : {1, 3, 7, 13, 16})
      for (int mode = 0; mode < 4; ++mode)
        for (bool relu : {true, false}) {
          fails += run_bn_add_act<float>(2, C, 5, layout, mode, relu, rng) != 0;
          fails += run_bn_add_act<double>(3, C, 4, layout, mode, relu, rng) != 0;
          cases += 2;
        }
  for (int64_t C : {1, 3, 13}) {
    fails += run_finalize<float>(C, {40}, rng) != 0;
    fails += run_finalize<double>(C, {10, 0, 31, 1, 33}, rng) != 0;
    fails += run_finalize<float>(C, {7, 7, 7, 7}, rng) != 0;
    cases += 3;
  }
  std::printf("%d passed, %d failed\n", cases - fails, fails);
  return fails == 0 ? 0 : 1;
}
