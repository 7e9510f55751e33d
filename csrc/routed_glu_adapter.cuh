// What the hard-routed GLU adapter's three CUDA files share (pure CUDA: no torch headers):
// - routed_glu_adapter.cu: the launchers of routed_glu_adapter.h; they pick a kernel family per call;
// - routed_glu_adapter_cuda_core.cu: the CUDA-core kernels, and the fixed-order reduction both families use;
// - routed_glu_adapter_tensor_core.cu: the tensor-core (WMMA) kernels.
// Each family launches only the kernels it defines, through the launch functions declared here, so that every
// .cu compiles on its own (plain nvcc -c, no relocatable device code). Pointers, shapes and dtype as in
// routed_glu_adapter.h; the sizes are already checked (valid_sizes) and the tokens are > 0 unless noted.
//
// Backward workspace (the launcher lays it out): per token the vectors [a (r), dh_down (r), dh_gate (r), rstd]
// (3 r + 1 floats, tok_ws), then per (split, expert) one partial slab (slab_floats). Both families write the same
// layout, so either one's partials go through the same reduction.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_utils.cuh"

namespace pill_cuda {

// Weight-gradient tiles of the CUDA-core kernels: kChunk consecutive d per block (128 contiguous bytes of a bf16
// row per token), the r columns split over kThreads / kChunk thread groups. The token splits are chosen
// (routed_glu_adapter_backward_splits) for this many D chunks, whichever family runs.
constexpr int kChunk = 64;
// Hidden columns per pass step of the tensor-core kernels; they take only D that is a multiple of it.
constexpr int kMmaChunk = 64;

// Floats per (split, expert) partial slab: dW_up [r, D], S_down [D, r], S_gate [D, r], q [D].
__host__ __device__ inline size_t slab_floats(int D, int r) { return 3 * static_cast<size_t>(D) * r + D; }

// CUDA-core kernels (routed_glu_adapter_cuda_core.cu): every dtype and shape the launchers accept.
cudaError_t launch_routed_glu_forward(Dtype dtype, const void* x, const void* w_down, const void* w_gate,
                                      const void* w_up, const int64_t* expert_ids, const void* norm_weight, void* y,
                                      long long tokens, int hidden, int rank, int experts, float eps,
                                      cudaStream_t stream);
// grad_x and tok_ws.
cudaError_t launch_routed_glu_backward_token(Dtype dtype, const void* grad_y, const void* x, const void* w_down,
                                             const void* w_gate, const void* w_up, const int64_t* expert_ids,
                                             const void* norm_weight, void* grad_x, float* tok_ws, long long tokens,
                                             int hidden, int rank, int experts, float eps, cudaStream_t stream);
// The partial slabs from tok_ws; tokens may be 0 (the slabs are then zeros).
cudaError_t launch_routed_glu_weight_grad(Dtype dtype, const void* grad_y, const void* x,
                                          const int64_t* expert_ids, const float* tok_ws, float* partials,
                                          long long tokens, int hidden, int rank, int experts, int splits, bool norm,
                                          cudaStream_t stream);
// Sums the partial slabs of either family in split order into the weight gradients (and the norm weight's,
// when norm_weight is not null).
cudaError_t launch_routed_glu_reduce(Dtype dtype, const float* partials, const void* w_down, const void* w_gate,
                                     const void* norm_weight, void* grad_w_down, void* grad_w_gate, void* grad_w_up,
                                     void* grad_norm_weight, int hidden, int rank, int experts, int splits,
                                     cudaStream_t stream);

// Tensor-core kernels (routed_glu_adapter_tensor_core.cu), for the calls the launchers' use_mma() accepts
// only: float16 / bfloat16, r of 16 or 32, D a multiple of kMmaChunk, 16-byte aligned operands, sm_80 or newer.
cudaError_t launch_routed_glu_forward_mma(Dtype dtype, const void* x, const void* w_down, const void* w_gate,
                                          const void* w_up, const int64_t* expert_ids, const void* norm_weight,
                                          void* y, long long tokens, int hidden, int rank, int experts, float eps,
                                          cudaStream_t stream);
cudaError_t launch_routed_glu_backward_token_mma(Dtype dtype, const void* grad_y, const void* x, const void* w_down,
                                                 const void* w_gate, const void* w_up, const int64_t* expert_ids,
                                                 const void* norm_weight, void* grad_x, float* tok_ws,
                                                 long long tokens, int hidden, int rank, int experts, float eps,
                                                 cudaStream_t stream);
// The tensor-core kernel stores fragments straight into the slabs: partials must be 256-bit aligned.
cudaError_t launch_routed_glu_weight_grad_mma(Dtype dtype, const void* grad_y, const void* x,
                                              const int64_t* expert_ids, const float* tok_ws, float* partials,
                                              long long tokens, int hidden, int rank, int experts, int splits,
                                              bool norm, cudaStream_t stream);

}  // namespace pill_cuda
