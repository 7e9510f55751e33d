// Launchers of the soft-routed adapter CUDA kernels (csrc/soft_routed_adapter.cu), called by the torch binding
// csrc/soft_routed_adapter_cuda.cpp. Raw pointers of contiguous tensors; no torch types.
//
// Shapes (pill_kernels/reference.py soft_routed_adapter): x, y, grad_y, dx [T, D]; w_down [D, r]; b_down [r];
// w_up [E, r, D]; b_up [E, D]; routing_weights [T, E]; dropout_mask [T, r] or nullptr; norm_weight [D] or
// nullptr. All floating tensors share `dtype`; 1 <= r <= kMaxRank.
#pragma once

#include <cstddef>

#include "pill_cuda.h"

namespace pill_cuda {

cudaError_t soft_routed_adapter_forward(Dtype dtype, const void* x, const void* w_down, const void* b_down,
                                        const void* w_up, const void* b_up, const void* routing_weights,
                                        const void* dropout_mask, const void* norm_weight, void* y, long long tokens,
                                        int hidden, int rank, int experts, float eps, float scale,
                                        cudaStream_t stream);

// Token splits of the deterministic weight-gradient pass on the current device, and the fp32 workspace the
// backward needs for them.
int soft_routed_adapter_backward_splits(long long tokens, int hidden, int experts);
size_t soft_routed_adapter_backward_workspace_floats(long long tokens, int hidden, int rank, int experts, int splits);

// grad_norm_weight may be nullptr exactly when norm_weight is.
cudaError_t soft_routed_adapter_backward(Dtype dtype, const void* grad_y, const void* x, const void* w_down,
                                         const void* b_down, const void* w_up, const void* b_up,
                                         const void* routing_weights, const void* dropout_mask,
                                         const void* norm_weight, void* grad_x, void* grad_w_down,
                                         void* grad_b_down, void* grad_w_up, void* grad_b_up,
                                         void* grad_routing_weights, void* grad_norm_weight, float* workspace,
                                         int splits, long long tokens, int hidden, int rank, int experts, float eps,
                                         float scale, cudaStream_t stream);

}  // namespace pill_cuda
