// CUTLASS weight-gradient convolution with the BatchNorm+ReLU prologue recomputed on load, float16 storage: one heavy template instantiation per file.
#include "conv_cutlass_impl.h"

#ifdef FUSEDRES_WITH_CUTLASS
#include "conv_wgrad.cuh"

namespace fusedres {
namespace cutlass_conv {

ConvStatus wgrad_fused_f16(const ConvWgradParams& p, cudaStream_t stream, bool check_only) {
  return run_wgrad_fused<cutlass::half_t>(p, stream, check_only);
}

}  // namespace cutlass_conv
}  // namespace fusedres
#endif
