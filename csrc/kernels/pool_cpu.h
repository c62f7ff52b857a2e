// Max pooling of an NHWC (channels_last) activation on the CPU, torch-free. Storage types T:
// float, double, Half, BFloat16 (half_types.h).
//
// Values are those of torch.nn.functional.max_pool2d (dilation 1, floor mode): each output is
// the largest input of its window, padding excluded; a NaN in the window wins (the last one in
// row-major window order, as PyTorch's kernel takes it), and the element is copied, so a NaN
// keeps its payload where PyTorch's 16-bit kernel may canonicalise it. With relu, every input
// goes through torch.relu first (x < 0 -> +0; -0 and NaN stay), giving max_pool2d(relu(x))
// bit for bit in one pass. No indices are written.
#pragma once

#include <cstdint>

#include "half_types.h"

namespace fusedres {

struct MaxPoolParams {
  int64_t n, c, h, w;  // input [N, H, W, C] in memory
  int64_t p, q;        // output rows and columns
  int64_t kh, kw, sh, sw, ph, pw;
  bool relu;
};

// Output rows [row_begin, row_end) of the N*P rows (one row: Q pixels of C channels).
template <typename T>
void max_pool_nhwc_cpu(const T* x, T* y, const MaxPoolParams& p, int64_t row_begin, int64_t row_end);

}  // namespace fusedres
