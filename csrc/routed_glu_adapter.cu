// Hard-routed GLU adapter experts (PILL MoMAE; E = 1 is PILL's attention adapter), optional fused RMSNorm.
//
//   n = RMSNorm(x; g, eps) or x;   y[t] = n[t] + W_up[e](SiLU(n[t] W_gate[e]) * (n[t] W_down[e])),  e = ids[t]
//
// Two kernel families compute it, one file each: the CUDA-core kernels (routed_glu_adapter_cuda_core.cu; one
// warp per token, every dtype and shape) and the tensor-core kernels (routed_glu_adapter_tensor_core.cu; WMMA
// on token tiles, the half types at the shapes use_mma() accepts). These launchers choose the family per call
// and run it through its launch functions (routed_glu_adapter.cuh). Both families write the same backward
// workspace, laid out here, and share the CUDA-core fixed-order reduction of the weight gradients.
#include <cstdlib>

#include "routed_glu_adapter.cuh"
#include "routed_glu_adapter.h"

namespace pill_cuda {
namespace {

// The tensor-core kernels take the call: half types, r of 16 or 32, D a multiple of 64, 16-byte aligned
// operands, compute capability 8.0 or newer; PILL_KERNELS_CUDA_MMA=0 turns them off (to compare the paths).
bool use_mma(Dtype dtype, int hidden, int rank, std::initializer_list<const void*> operands) {
  if (dtype != Dtype::kFloat16 && dtype != Dtype::kBFloat16) return false;
  if ((rank != 16 && rank != 32) || hidden % kMmaChunk != 0 || !rows_vectorizable(hidden, 8, operands))
    return false;
  const char* env = std::getenv("PILL_KERNELS_CUDA_MMA");
  if (env != nullptr && env[0] == '0') return false;
  int device = 0, major = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 8;
}

}  // namespace

cudaError_t routed_glu_adapter_forward(Dtype dtype, const void* x, const void* w_down, const void* w_gate,
                                       const void* w_up, const int64_t* expert_ids, const void* norm_weight,
                                       void* y, long long tokens, int hidden, int rank, int experts, float eps,
                                       cudaStream_t stream) {
  // With no tokens the ids tensor is empty, and its data pointer null.
  if (!valid_sizes(tokens, hidden, rank, experts) || (expert_ids == nullptr && experts != 1 && tokens > 0))
    return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  if (use_mma(dtype, hidden, rank, {x, y, w_down, w_gate, w_up, norm_weight}))
    return launch_routed_glu_forward_mma(dtype, x, w_down, w_gate, w_up, expert_ids, norm_weight, y, tokens, hidden,
                                         rank, experts, eps, stream);
  return launch_routed_glu_forward(dtype, x, w_down, w_gate, w_up, expert_ids, norm_weight, y, tokens, hidden, rank,
                                   experts, eps, stream);
}

// The partial slabs start 64 floats aligned after the per-token vectors: the tensor-core weight-gradient kernel
// stores fragments straight into them (256-bit aligned addresses).
size_t partials_offset(long long tokens, int rank) {
  const size_t tok = static_cast<size_t>(tokens > 0 ? tokens : 0) * (3 * static_cast<size_t>(rank) + 1);
  return (tok + 63) / 64 * 64;
}

int routed_glu_adapter_backward_splits(long long tokens, int hidden, int experts) {
  const long long chunks = (hidden + kChunk - 1) / kChunk;
  return choose_splits(tokens, chunks * (experts > 0 ? experts : 1));
}

size_t routed_glu_adapter_backward_workspace_floats(long long tokens, int hidden, int rank, int experts,
                                                    int splits) {
  return partials_offset(tokens, rank) + static_cast<size_t>(splits) * experts * slab_floats(hidden, rank);
}

cudaError_t routed_glu_adapter_backward(Dtype dtype, const void* grad_y, const void* x, const void* w_down,
                                        const void* w_gate, const void* w_up, const int64_t* expert_ids,
                                        const void* norm_weight, void* grad_x, void* grad_w_down,
                                        void* grad_w_gate, void* grad_w_up, void* grad_norm_weight,
                                        float* workspace, int splits, long long tokens, int hidden, int rank,
                                        int experts, float eps, cudaStream_t stream) {
  // With no tokens the ids tensor is empty, and its data pointer null.
  if (!valid_sizes(tokens, hidden, rank, experts) || (expert_ids == nullptr && experts != 1 && tokens > 0) ||
      splits < 1 || (norm_weight == nullptr) != (grad_norm_weight == nullptr))
    return cudaErrorInvalidValue;
  float* tok_ws = workspace;
  float* partials = workspace + partials_offset(tokens, rank);
  const bool norm = norm_weight != nullptr;
  // With no tokens only the CUDA-core weight-gradient pass runs: its zero slabs give the zero weight gradients.
  const bool mma = tokens > 0 && use_mma(dtype, hidden, rank, {x, grad_y, grad_x, w_down, w_gate, w_up, norm_weight});
  cudaError_t err = cudaSuccess;
  if (mma) {
    err = launch_routed_glu_backward_token_mma(dtype, grad_y, x, w_down, w_gate, w_up, expert_ids, norm_weight, grad_x,
                                               tok_ws, tokens, hidden, rank, experts, eps, stream);
    if (err == cudaSuccess)
      err = launch_routed_glu_weight_grad_mma(dtype, grad_y, x, expert_ids, tok_ws, partials, tokens, hidden, rank,
                                              experts, splits, norm, stream);
  } else {
    if (tokens > 0)
      err = launch_routed_glu_backward_token(dtype, grad_y, x, w_down, w_gate, w_up, expert_ids, norm_weight, grad_x,
                                             tok_ws, tokens, hidden, rank, experts, eps, stream);
    if (err == cudaSuccess)
      err = launch_routed_glu_weight_grad(dtype, grad_y, x, expert_ids, tok_ws, partials, tokens, hidden, rank,
                                          experts, splits, norm, stream);
  }
  if (err != cudaSuccess) return err;
  return launch_routed_glu_reduce(dtype, partials, w_down, w_gate, norm_weight, grad_w_down, grad_w_gate, grad_w_up,
                                  grad_norm_weight, hidden, rank, experts, splits, stream);
}

}  // namespace pill_cuda
