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

}  // namespace fusedres
