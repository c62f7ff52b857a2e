// CUTLASS weight-gradient convolution (parallel split-K slices), bfloat16 storage: one heavy template instantiation per file.
#include "conv_cutlass_impl.h"

#ifdef FUSEDRES_WITH_CUTLASS
#include "conv_wgrad.cuh"

namespace fusedres {
namespace cutlass_conv {

ConvStatus wgrad_bf16(const ConvWgradParams& p, cudaStream_t stream, bool check_only) {
  return run_wgrad<cutlass::bfloat16_t>(p, stream, check_only);
}

}  // namespace cutlass_conv
}  // namespace fusedres
#endif
