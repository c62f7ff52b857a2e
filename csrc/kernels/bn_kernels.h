// Torch-free BatchNorm-family kernels of fusedres: raw pointers, sizes and (for CUDA)
// a cudaStream_t. The binding layer (csrc/bindings*.cpp/.cu) turns tensors into these
// arguments; CMake builds and tests the kernels on their own.
//
// Layouts: a 4-D tensor of logical shape [N, C, H, W] stored either NCHW (contiguous,
// the spatial index is the fastest) or NHWC (channels_last, the channel is the fastest).
// "S" is the compute/statistics type: float for float, half and bfloat16 storage, double
// for double storage. Per-channel and per-sample vectors are given in S.
//
// CPU declarations: bn_cpu.h. CUDA declarations: bn_cuda.cuh.
#pragma once

#include <cstdint>

#ifndef FUSEDRES_HD
#if defined(__CUDACC__)
#define FUSEDRES_HD __host__ __device__ __forceinline__
#else
#define FUSEDRES_HD inline
#endif
#endif

namespace fusedres {

enum class Layout : int { NCHW = 0, NHWC = 1 };

// out = act((y*scale[c] + shift[c]) * sample_scale[n] + r)
//   r = residual*res_scale[c] + res_shift[c]   (res_scale != nullptr: "dual BN")
//     = residual                               (residual != nullptr)
//     = 0
// act = ReLU (NaN-propagating, like torch.relu) when relu, identity otherwise.
// residual and out have y's shape and layout.
template <typename S>
struct BnAddActParams {
  int64_t n = 0, c = 0, hw = 0;  // N, C, H*W
  Layout layout = Layout::NCHW;
  const S* scale = nullptr;         // [C]
  const S* shift = nullptr;         // [C]
  const S* res_scale = nullptr;     // [C] or nullptr (only with a residual)
  const S* res_shift = nullptr;     // [C] or nullptr (given iff res_scale is)
  const S* sample_scale = nullptr;  // [N] or nullptr
  bool relu = true;
};

// Chan merge of per-tile (count, mean, M2) partials, then the BatchNorm affine terms:
//   partials: [T, 3, C] (row 0 count, row 1 mean, row 2 M2), merged in tile order
//             t = 0..T-1 in double; tiles with count 0 are skipped
//   mean, invstd, scale, shift: [C] outputs;  var = M2/n (biased), invstd = 1/sqrt(var + eps)
//   scale = gamma*invstd, shift = beta - mean*scale
//   running_mean/var (nullable, both or neither, updated in place):
//     (1-m)*running_mean + m*mean,  (1-m)*running_var + m*M2/(n-1)
template <typename S>
struct BnFinalizeParams {
  int64_t tiles = 0, c = 0;
  const S* partials = nullptr;
  const S* gamma = nullptr;
  const S* beta = nullptr;
  S* running_mean = nullptr;
  S* running_var = nullptr;
  double momentum = 0.1, eps = 1e-5;
  S* mean = nullptr;
  S* invstd = nullptr;
  S* scale = nullptr;
  S* shift = nullptr;
};

// Per-tile batch statistics of a 4-D tensor x (the statistics half of conv_stats, for a
// BatchNorm that has no conv before it):
//   the M = N*H*W pixels ("rows", in (n, h, w) order) are split into `tiles` contiguous
//   tiles by stats_tile_begin (tiles = 1: the whole batch, fusedres.reference's layout);
//   partials: [T, 3, C] output, row 0 count, row 1 mean, row 2 M2 = sum (x - mean)^2 of
//   tile t's values of channel c. An empty tile is (0, NaN, 0), as the reference gives for
//   an empty batch. Values are accumulated in blocks of rows with a two-pass mean/M2 per
//   block, and the blocks are Chan-merged in a fixed order in double: deterministic, no
//   E[x^2] - E[x]^2.
template <typename S>
struct BatchStatsParams {
  int64_t n = 0, c = 0, hw = 0;  // N, C, H*W
  Layout layout = Layout::NCHW;
  int64_t tiles = 1;
  S* partials = nullptr;  // [T, 3, C]
};

// First row of tile t when M rows are split into T tiles as evenly as possible (the first
// M % T tiles have one row more); t in [0, T], stats_tile_begin(M, T, T) == M.
FUSEDRES_HD int64_t stats_tile_begin(int64_t m, int64_t tiles, int64_t t) {
  const int64_t q = m / tiles, r = m % tiles;
  return t * q + (t < r ? t : r);
}

// BatchNorm(+ReLU) backward. With y the BatchNorm input (the raw conv output), per element
//   g    = dout, zeroed where the ReLU was inactive (relu only): z <= 0 with z = out when the
//          activated output is given, z = y*scale + shift otherwise (NaN z keeps dout, like
//          threshold_backward), then times sample_scale[n] when given
//   xhat = (y - mean) * invstd
// bn_backward_reduce: sum_g = sum g, sum_gx = sum g*xhat per channel (dbeta, dgamma),
//   per-block partial sums merged in a fixed order in double.
// bn_backward_apply:  dy = A*g + B*y + C with the per-channel coefficients of
//   bn_backward_coefs (coefs rows A, B, C), M = N*H*W:
//   A = scale, B = -scale*invstd*sum_gx/M, C = -A*sum_g/M - B*mean
// dout, y, out and dy share one shape and layout.
template <typename S>
struct BnBackwardParams {
  int64_t n = 0, c = 0, hw = 0;  // N, C, H*W
  Layout layout = Layout::NCHW;
  const S* mean = nullptr;          // [C]
  const S* invstd = nullptr;        // [C]
  const S* scale = nullptr;         // [C] gamma*invstd
  const S* shift = nullptr;         // [C] beta - mean*scale
  const S* sample_scale = nullptr;  // [N] or nullptr
  bool relu = true;
  S* sum_g = nullptr;               // [C] output of bn_backward_reduce
  S* sum_gx = nullptr;              // [C] output of bn_backward_reduce
  const S* coefs = nullptr;         // [3, C] input of bn_backward_apply
};

// act_grad: dx = dout where out > 0, else 0 (ReLU backward from its output; NaN out keeps
// dout), elementwise over dout and out stored in one layout.

// The coefficients of one channel, in S and in the reference's order of operations
// (fusedres.reference.bn_backward_apply), so that they match it bit for bit on the CPU.
template <typename S>
FUSEDRES_HD void bn_backward_coefs_channel(S scale, S invstd, S mean, S sum_g, S sum_gx, S m, S* a, S* b, S* c) {
  const S bb = -scale * invstd * sum_gx / m;
  *a = scale;
  *b = bb;
  *c = -scale * sum_g / m - bb * mean;
}

}  // namespace fusedres
