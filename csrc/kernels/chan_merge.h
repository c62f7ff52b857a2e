// One channel of bn_finalize, shared by the CPU and CUDA kernels (host and device code):
// Chan's parallel merge of per-tile (count, mean, M2) in tile order, in double, then the
// BatchNorm affine terms and the running-statistics update of nn.BatchNorm2d.
#pragma once

#include <cmath>
#include <cstdint>

#include "bn_kernels.h"

#if defined(__CUDACC__)
#define FUSEDRES_HD __host__ __device__ __forceinline__
#else
#define FUSEDRES_HD inline
#endif

namespace fusedres {

// x / count rounded once to float, for a positive integer count below 2^24, with no division.
// (On the GPU an IEEE division calls a subroutine for its slow path, and the registers live
// across such calls spilled in the batch_stats kernels.) inv_count must be 1.0 / count rounded
// to double. Markstein's correction step makes q the double nearest x / count, and rounding
// that to float is the float nearest x / count: a second rounding of a quotient is exact when
// the first precision (53 bits) is at least twice the second (24) plus two. Zero, +-inf and
// NaN are returned as they are, as the division would (NaN payloads aside).
FUSEDRES_HD float div_by_count(float x, double count, double inv_count) {
  const double xd = x;
  if (!(std::fabs(xd) > 0.0 && std::fabs(xd) <= 1.7976931348623157e308)) return x;
  const double q0 = xd * inv_count;
  const double r = std::fma(-q0, count, xd);  // exact
  return static_cast<float>(std::fma(r, inv_count, q0));
}
FUSEDRES_HD double div_by_count(double x, double count, double) { return x / count; }

template <typename S>
FUSEDRES_HD void finalize_channel(const BnFinalizeParams<S>& p, int64_t c) {
  const int64_t C = p.c;
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (int64_t t = 0; t < p.tiles; ++t) {
    const S* tile = p.partials + t * 3 * C;
    const double nb = tile[c], mb = tile[C + c], m2b = tile[2 * C + c];
    if (nb <= 0.0) continue;
    const double tot = n + nb;
    const double delta = mb - mean;
    m2 += m2b + delta * delta * n * nb / tot;
    // weighted-sum mean (not mean + delta*nb/tot): equal in finite arithmetic, and keeps
    // +-Inf like a plain sum when two tiles average to the same infinity
    mean = (n * mean + nb * mb) / tot;
    n = tot;
  }
  const double inv = 1.0 / sqrt(m2 / n + p.eps);
  const S mean_s = static_cast<S>(mean), inv_s = static_cast<S>(inv);
  const S sc = static_cast<S>(p.gamma[c]) * inv_s;
  p.mean[c] = mean_s;
  p.invstd[c] = inv_s;
  p.scale[c] = sc;
  p.shift[c] = static_cast<S>(p.beta[c]) - mean_s * sc;
  if (p.running_mean != nullptr) {
    const double m = p.momentum;
    p.running_mean[c] = static_cast<S>((1.0 - m) * p.running_mean[c] + m * mean_s);
    p.running_var[c] = static_cast<S>((1.0 - m) * p.running_var[c] + m * (m2 / (n - 1.0)));
  }
}

}  // namespace fusedres
