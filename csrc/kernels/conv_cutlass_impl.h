// Internal: the per-dtype CUTLASS instantiations behind the launchers of conv_cutlass.h, one
// per .cu file (conv_{fprop,fprop_fused,fprop_group,dgrad,dgrad_unity,wgrad,wgrad_fused}_{f16,bf16}.cu,
// conv_fprop_sm90{,_res}_bf16.cu) so that a parallel build compiles them side by side. check_only: build the CUTLASS arguments and run
// can_implement() on the host, launch nothing (no GPU needed).
#pragma once

#include "conv_cutlass.h"

namespace fusedres {
namespace cutlass_conv {

#define FUSEDRES_CONV_DECLARE(name, Params)                                           \
  ConvStatus name##_f16(const Params& p, cudaStream_t stream, bool check_only);       \
  ConvStatus name##_bf16(const Params& p, cudaStream_t stream, bool check_only);

FUSEDRES_CONV_DECLARE(fprop, ConvFpropParams)        // kFprop: broadcast epilogue
FUSEDRES_CONV_DECLARE(fprop_fused, ConvFpropParams)  // kFpropPrologue: mainloop fusion
FUSEDRES_CONV_DECLARE(fprop_group, ConvFpropParams)  // kFprop with groups > 1
FUSEDRES_CONV_DECLARE(dgrad, ConvDgradParams)        // stride > 1: strided dgrad
FUSEDRES_CONV_DECLARE(dgrad_unity, ConvDgradParams)  // stride 1
// wgrad: float32 slices into p.workspace (the reduction to dw is conv_cutlass.cu's)
FUSEDRES_CONV_DECLARE(wgrad, ConvWgradParams)
FUSEDRES_CONV_DECLARE(wgrad_fused, ConvWgradParams)

#undef FUSEDRES_CONV_DECLARE

// kFprop on Hopper (conv_fprop_sm90.cuh, CUTLASS 3.x: TMA + wgmma), bfloat16, groups 1, no
// prologue: without and with the residual. kUnsupported where CUTLASS 3.x refuses the problem.
ConvStatus fprop_sm90_bf16(const ConvFpropParams& p, cudaStream_t stream, bool check_only);
ConvStatus fprop_sm90_res_bf16(const ConvFpropParams& p, cudaStream_t stream, bool check_only);

}  // namespace cutlass_conv
}  // namespace fusedres
