// BatchNorm folding of a convolution weight on the CPU, torch-free: out[k, ...] =
// weight[k, ...] * scale[k], multiplied in float32 and stored in the output type, with the
// values of PyTorch's (weight.float() * scale.view(-1, 1, 1, 1)).to(dtype) bit for bit (one
// pass where PyTorch makes two or three). Storage types In, Out: float, Half, BFloat16
// (half_types.h).
#pragma once

#include <cstdint>

#include "half_types.h"

namespace fusedres {

// Output channels [k_begin, k_end) of a weight whose channel k is the dense block of `block`
// elements at k * block (contiguous or channels_last: the output channel is outermost in both).
template <typename In, typename Out>
void fold_scale_cpu(const In* w, const float* scale, Out* out, int64_t block, int64_t k_begin, int64_t k_end);

}  // namespace fusedres
