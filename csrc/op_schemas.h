// Schemas of the compiled ops, shared by the extension (csrc/extension.cpp, namespace pill_kernels_C) and the
// tests' CPU emulation of the CUDA kernels (tests/cuda_emulation/, namespace pill_kernels_C_cuda_emulated).
#pragma once

#include <torch/library.h>

namespace pill_kernels {

inline void define_compiled_ops(torch::Library& m) {
  m.def("routed_glu_adapter_forward(Tensor x, Tensor w_down, Tensor w_gate, Tensor w_up, Tensor? expert_ids, "
        "Tensor? norm_weight, float eps) -> Tensor");
  m.def("routed_glu_adapter_backward(Tensor grad_y, Tensor x, Tensor w_down, Tensor w_gate, Tensor w_up, "
        "Tensor? expert_ids, Tensor? norm_weight, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Training pair: the forward also returns the GLU's inputs uv = [n W_down | n W_gate] per token ([T, 2r], in
  // the accumulation dtype: fp32, fp64 for fp64), which the backward then reads instead of recomputing them
  // (a quarter of its products). Kernels may implement only the pair above; the Python layer uses this pair
  // where a backend registers it.
  m.def("routed_glu_adapter_forward_saving(Tensor x, Tensor w_down, Tensor w_gate, Tensor w_up, "
        "Tensor? expert_ids, Tensor? norm_weight, float eps) -> (Tensor, Tensor)");
  m.def("routed_glu_adapter_backward_from_saved(Tensor grad_y, Tensor uv, Tensor x, Tensor w_down, "
        "Tensor w_gate, Tensor w_up, Tensor? expert_ids, Tensor? norm_weight, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_routed_adapter_forward(Tensor x, Tensor w_down, Tensor b_down, Tensor w_up, Tensor b_up, "
        "Tensor routing_weights, Tensor? dropout_mask, Tensor? norm_weight, float eps, float scale) -> Tensor");
  m.def("soft_routed_adapter_backward(Tensor grad_y, Tensor x, Tensor w_down, Tensor b_down, Tensor w_up, "
        "Tensor b_up, Tensor routing_weights, Tensor? dropout_mask, Tensor? norm_weight, float eps, float scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("modality_gate_forward(Tensor x, Tensor w_gate, Tensor v, Tensor image_mask) -> Tensor");
  m.def("modality_gate_backward(Tensor grad_v, Tensor x, Tensor w_gate, Tensor v, Tensor image_mask) "
        "-> (Tensor, Tensor, Tensor)");
}

}  // namespace pill_kernels
