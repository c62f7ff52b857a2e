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

}  // namespace fusedres
