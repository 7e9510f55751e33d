// Launchers of the hard-routed GLU adapter CUDA kernels (csrc/routed_glu_adapter.cu), called by the torch
// binding csrc/routed_glu_adapter_cuda.cpp. Raw pointers of contiguous tensors; no torch types.
//
// Shapes (pill_kernels/reference.py routed_glu_adapter): x, y, grad_y, dx [T, D]; w_down, w_gate [E, D, r];
// w_up [E, r, D]; expert_ids int64 [T] or nullptr (then E must be 1); norm_weight [D] or nullptr (no fused
// RMSNorm). All floating tensors share `dtype`; 1 <= r <= kMaxRank.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pill_cuda.h"

namespace pill_cuda {

cudaError_t routed_glu_adapter_forward(Dtype dtype, const void* x, const void* w_down, const void* w_gate,
                                       const void* w_up, const int64_t* expert_ids, const void* norm_weight,
                                       void* y, long long tokens, int hidden, int rank, int experts, float eps,
                                       cudaStream_t stream);

// Token splits of the deterministic weight-gradient pass on the current device, and the fp32 workspace the
// backward needs for them (per-token vectors plus one partial slab per split and expert).
int routed_glu_adapter_backward_splits(long long tokens, int hidden, int experts);
size_t routed_glu_adapter_backward_workspace_floats(long long tokens, int hidden, int rank, int experts, int splits);

// grad_norm_weight may be nullptr exactly when norm_weight is. `workspace` holds at least
// routed_glu_adapter_backward_workspace_floats(...) floats; no initialisation needed.
cudaError_t routed_glu_adapter_backward(Dtype dtype, const void* grad_y, const void* x, const void* w_down,
                                        const void* w_gate, const void* w_up, const int64_t* expert_ids,
                                        const void* norm_weight, void* grad_x, void* grad_w_down,
                                        void* grad_w_gate, void* grad_w_up, void* grad_norm_weight,
                                        float* workspace, int splits, long long tokens, int hidden, int rank,
                                        int experts, float eps, cudaStream_t stream);

}  // namespace pill_cuda
