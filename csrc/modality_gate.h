// Launchers of the modality-gate CUDA kernels (csrc/modality_gate.cu), called by the torch binding
// csrc/modality_gate_cuda.cpp. Raw pointers of contiguous tensors; no torch types.
//
// Shapes (pill_kernels/reference.py modality_gate): x, grad_x [T, D]; w_gate [D, H]; v, out, grad_v,
// grad_v_in [T, H, hd]; image_mask bool [T]. All floating tensors share `dtype`.
#pragma once

#include <cstddef>

#include "pill_cuda.h"

namespace pill_cuda {

cudaError_t modality_gate_forward(Dtype dtype, const void* x, const void* w_gate, const void* v,
                                  const bool* image_mask, void* out, long long tokens, int hidden, int heads,
                                  int head_dim, cudaStream_t stream);

int modality_gate_backward_splits(long long tokens, int hidden, int heads);
size_t modality_gate_backward_workspace_floats(long long tokens, int hidden, int heads, int splits);

cudaError_t modality_gate_backward(Dtype dtype, const void* grad_out, const void* x, const void* w_gate,
                                   const void* v, const bool* image_mask, void* grad_x, void* grad_w_gate,
                                   void* grad_v, float* workspace, int splits, long long tokens, int hidden,
                                   int heads, int head_dim, cudaStream_t stream);

}  // namespace pill_cuda
