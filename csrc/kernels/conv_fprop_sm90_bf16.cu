// Hopper-native forward convolution (conv_fprop_sm90.cuh), bfloat16, no residual: one heavy
// template instantiation per file.
#include "conv_cutlass_impl.h"

#if defined(FUSEDRES_WITH_CUTLASS) && defined(FUSEDRES_WITH_CUTLASS_SM90)
#include "conv_fprop_sm90.cuh"

namespace fusedres {
namespace cutlass_conv {

ConvStatus fprop_sm90_bf16(const ConvFpropParams& p, cudaStream_t stream, bool check_only) {
  return sm90::run_fprop<cutlass::bfloat16_t, false>(p, stream, check_only);
}

}  // namespace cutlass_conv
}  // namespace fusedres
#endif
