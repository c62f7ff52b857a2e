// CPU kernels of bn_kernels.h. Storage types T: float, double, Half, BFloat16
// (half_types.h); compute type S: double for double storage, float otherwise.
//
// The kernels are single-threaded over a range of work items so that any caller can
// parallelise them (the extension uses at::parallel_for, the C++ tests call them directly).
#pragma once

#include <cstdint>

#include "bn_kernels.h"
#include "half_types.h"

namespace fusedres {

// bn_add_act works in "rows", split by the caller into [row_begin, row_end):
//   NHWC: a row is one pixel (n, h, w) with its C channels; rows = N*H*W, row length C
//   NCHW: a row is one (n, c) plane of H*W values;          rows = N*C,   row length H*W
inline int64_t bn_add_act_rows(int64_t n, int64_t c, int64_t hw, Layout layout) {
  return layout == Layout::NHWC ? n * hw : n * c;
}

inline int64_t bn_add_act_row_length(int64_t c, int64_t hw, Layout layout) {
  return layout == Layout::NHWC ? c : hw;
}

template <typename T, typename S>
void bn_add_act_cpu(const T* y, const T* residual, T* out, const BnAddActParams<S>& p, int64_t row_begin,
                    int64_t row_end);

// Channels [c_begin, c_end) of the finalize; deterministic (tile order fixed).
template <typename S>
void bn_finalize_cpu(const BnFinalizeParams<S>& p, int64_t c_begin, int64_t c_end);

// Smallest total count over all channels (tiles with count <= 0 contribute nothing), i.e.
// the number of values each channel's statistics are computed from; the caller checks it
// is > 1 before updating running statistics (the unbiased variance divides by n - 1).
template <typename S>
double partials_min_count_cpu(const S* partials, int64_t tiles, int64_t c);

// ------------------------------------------------------------------------- reductions
// batch_stats and bn_backward_reduce run in two steps that a caller may parallelise:
//   1. "blocks" over work items [0, items): each item reduces one block of rows (pixels) of
//      one tile -- NHWC: all channels, NCHW: one channel -- into its own slot of a double
//      workspace of `work` elements (caller-allocated);
//   2. "merge" over channels: each channel's slots are merged in block order.
// Blocks and items depend on the shape only, so results do not depend on how a caller
// splits either step (or on its thread count).
struct CpuReduceGeom {
  int64_t rows = 1;      // rows per block
  int64_t per_tile = 1;  // blocks per tile (the last ones of a short tile may be empty)
  int64_t items = 0;     // step-1 work items
  int64_t work = 0;      // workspace size in doubles
};

CpuReduceGeom batch_stats_geom_cpu(int64_t n, int64_t c, int64_t hw, Layout layout, int64_t tiles);

// Step 1: items [item_begin, item_end) of batch_stats_geom_cpu; x in p.layout.
template <typename T, typename S>
void batch_stats_blocks_cpu(const T* x, const BatchStatsParams<S>& p, double* work, int64_t item_begin,
                            int64_t item_end);

// Step 2: writes p.partials for channels [c_begin, c_end).
template <typename S>
void batch_stats_merge_cpu(const BatchStatsParams<S>& p, const double* work, int64_t c_begin, int64_t c_end);

CpuReduceGeom bn_backward_reduce_geom_cpu(int64_t n, int64_t c, int64_t hw, Layout layout);

// Step 1 of bn_backward_reduce; out may be nullptr (mask from y*scale + shift).
template <typename T, typename S>
void bn_backward_reduce_blocks_cpu(const T* dout, const T* y, const T* out, const BnBackwardParams<S>& p,
                                   double* work, int64_t item_begin, int64_t item_end);

// Step 2: writes p.sum_g and p.sum_gx for channels [c_begin, c_end).
template <typename S>
void bn_backward_reduce_merge_cpu(const BnBackwardParams<S>& p, const double* work, int64_t c_begin,
                                  int64_t c_end);

// ----------------------------------------------------------------------- elementwise

// coefs [3, C] = rows A, B, C of bn_backward_apply from the reduce's sums (C-sized work).
template <typename S>
void bn_backward_coefs_cpu(const BnBackwardParams<S>& p, const S* sum_g, const S* sum_gx, S* coefs);

// dy = A*g + B*y + C (+ addend, one rounding) over the rows [row_begin, row_end) of
// bn_add_act_rows (same row definition as bn_add_act); reads p.coefs. grad_out, where given,
// receives g before the sample scale (dout masked by the ReLU: what act_grad computes when
// out is given). out, addend and grad_out (y's shape and layout) may be nullptr.
template <typename T, typename S>
void bn_backward_apply_cpu(const T* dout, const T* y, const T* out, const T* addend, T* grad_out, T* dy,
                           const BnBackwardParams<S>& p, int64_t row_begin, int64_t row_end);

// dx = out <= 0 ? 0 : dout over the flat elements [begin, end) (dout, out, dx in one layout).
template <typename T>
void act_grad_cpu(const T* dout, const T* out, T* dx, int64_t begin, int64_t end);

// x = x < 0 ? +0 : x in place over the flat elements [begin, end): torch.relu's values (NaN
// stays NaN, with its payload kept where torch's 16-bit ReLU may canonicalise it; -0 stays -0;
// -inf becomes +0). The 16-bit types work on the bit pattern alone (no conversion to float),
// which is what makes it a memory-speed pass.
template <typename T>
void relu_inplace_cpu(T* x, int64_t begin, int64_t end);

}  // namespace fusedres
