// CUDA launchers of the kernels in bn_kernels.h (same parameter structs). Storage types:
// float, double, __half, __nv_bfloat16; compute in S (float, or double for double).
#pragma once

#include <cuda_runtime.h>

#include "bn_kernels.h"

namespace fusedres {

// Launches on `stream`; returns the launch status (cudaGetLastError after the launch).
template <typename T, typename S>
cudaError_t bn_add_act_cuda(const T* y, const T* residual, T* out, const BnAddActParams<S>& p, cudaStream_t stream);

template <typename S>
cudaError_t bn_finalize_cuda(const BnFinalizeParams<S>& p, cudaStream_t stream);

}  // namespace fusedres
