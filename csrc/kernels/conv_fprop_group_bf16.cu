// CUTLASS grouped forward convolution (bias/ReLU epilogue), bfloat16 storage: one heavy template instantiation per file.
#include "conv_cutlass_impl.h"

#ifdef FUSEDRES_WITH_CUTLASS
#include "conv_fprop_group.cuh"

namespace fusedres {
namespace cutlass_conv {

ConvStatus fprop_group_bf16(const ConvFpropParams& p, cudaStream_t stream, bool check_only) {
  return run_fprop_group<cutlass::bfloat16_t>(p, stream, check_only);
}

}  // namespace cutlass_conv
}  // namespace fusedres
#endif
