// CUDA launchers of the kernels in bn_kernels.h (same parameter structs). Storage types:
// float, double, __half, __nv_bfloat16; compute in S (float, or double for double).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "bn_kernels.h"

namespace fusedres {

// Launches on `stream`; returns the launch status (cudaGetLastError after the launch).
template <typename T, typename S>
cudaError_t bn_add_act_cuda(const T* y, const T* residual, T* out, const BnAddActParams<S>& p, cudaStream_t stream);

template <typename S>
cudaError_t bn_finalize_cuda(const BnFinalizeParams<S>& p, cudaStream_t stream);

// The reductions (bn_reduce_cuda.cu) take a device workspace of the size their
// *_workspace function returns (bytes, 0 possible), owned by the caller and only used by
// the work queued on `stream`. Two launches each, no atomics, no host synchronisation.

// batch_stats: x in p.layout -> p.partials [T, 3, C].
template <typename T, typename S>
size_t batch_stats_cuda_workspace(const BatchStatsParams<S>& p);
template <typename T, typename S>
cudaError_t batch_stats_cuda(const T* x, const BatchStatsParams<S>& p, void* workspace, cudaStream_t stream);

// bn_backward_reduce: -> p.sum_g, p.sum_gx [C]; out may be nullptr.
template <typename T, typename S>
size_t bn_backward_reduce_cuda_workspace(const BnBackwardParams<S>& p);
template <typename T, typename S>
cudaError_t bn_backward_reduce_cuda(const T* dout, const T* y, const T* out, const BnBackwardParams<S>& p,
                                    void* workspace, cudaStream_t stream);

// bn_backward_apply (bn_backward_cuda.cu): coefs [3, C] from the sums, then dy from
// p.coefs (= coefs), plus addend (y's shape and layout) rounded once; grad_out, where given,
// receives g before the sample scale (as bn_backward_apply_cpu). out, addend and grad_out
// may be nullptr.
template <typename S>
cudaError_t bn_backward_coefs_cuda(const BnBackwardParams<S>& p, const S* sum_g, const S* sum_gx, S* coefs,
                                   cudaStream_t stream);
template <typename T, typename S>
cudaError_t bn_backward_apply_cuda(const T* dout, const T* y, const T* out, const T* addend, T* grad_out, T* dy,
                                   const BnBackwardParams<S>& p, cudaStream_t stream);

// act_grad: dx = out <= 0 ? 0 : dout over `total` elements stored in one layout.
template <typename T>
cudaError_t act_grad_cuda(const T* dout, const T* out, T* dx, int64_t total, cudaStream_t stream);

}  // namespace fusedres
