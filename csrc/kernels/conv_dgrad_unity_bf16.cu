// CUTLASS data-gradient convolution for unit stride (unity-stride dgrad), bfloat16 storage: one
// heavy template instantiation per file.
#include "conv_cutlass_impl.h"

#ifdef FUSEDRES_WITH_CUTLASS
#include "conv_dgrad.cuh"

namespace fusedres {
namespace cutlass_conv {

ConvStatus dgrad_unity_bf16(const ConvDgradParams& p, cudaStream_t stream, bool check_only) {
  return run_dgrad_unity<cutlass::bfloat16_t>(p, stream, check_only);
}

}  // namespace cutlass_conv
}  // namespace fusedres
#endif
