// Host reference for the kernel tests: the math of bn_kernels.h written the obvious way,
// in double, on logical [N, C, H, W] indices.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "bn_kernels.h"

namespace fusedres_test {

using fusedres::Layout;

inline int64_t offset(Layout l, int64_t n, int64_t c, int64_t i, int64_t C, int64_t HW) {
  return l == Layout::NHWC ? (n * HW + i) * C + c : (n * C + c) * HW + i;
}

inline double ref_bn_add_act(double y, double r, bool has_r, int64_t c, int64_t n, const std::vector<double>& s,
                             const std::vector<double>& t, const std::vector<double>* rs,
                             const std::vector<double>* rt, const std::vector<double>* k, bool relu) {
  double z = y * s[c] + t[c];
  if (k) z *= (*k)[n];
  if (has_r) z += rs ? r * (*rs)[c] + (*rt)[c] : r;
  return relu ? (z > 0 || z != z ? z : 0.0) : z;
}

struct Rng {
  std::mt19937_64 g{1234};
  std::vector<double> normal(size_t n, double mu = 0, double sd = 1) {
    std::normal_distribution<double> d(mu, sd);
    std::vector<double> v(n);
    for (auto& x : v) x = d(g);
    return v;
  }
};

struct Failures {
  int count = 0;
  void check(bool ok, const char* what, double got, double want) {
    if (!ok && count++ < 10) std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
  }
};

inline bool close(double a, double b, double tol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= tol * (1.0 + std::fabs(b));
}

}  // namespace fusedres_test
