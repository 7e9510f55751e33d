// Torch binding of the modality-gate CUDA kernels (csrc/modality_gate.cu): checks, output and workspace
// allocation on the current stream of x's device, launch. Built only in the CUDA build (setup.py).
#include <tuple>

#include "cuda_binding_utils.h"
#include "modality_gate.h"

namespace {

using at::Tensor;

struct Sizes {
  int64_t tokens;
  int hidden, heads, head_dim;
};

Sizes check_gate(const char* op, const Tensor& x, const Tensor& w_gate, const Tensor& v, const Tensor& image_mask) {
  pill_cuda::check_input(op, "x", x);
  pill_cuda::dtype_of(op, x);
  TORCH_CHECK(w_gate.dim() == 2, op, ": w_gate must be 2-D [D, H], got shape ", w_gate.sizes());
  TORCH_CHECK(v.dim() == 3, op, ": v must be 3-D [T, H, hd], got shape ", v.sizes());
  const int64_t T = x.size(0), D = x.size(1), H = w_gate.size(1), hd = v.size(2);
  TORCH_CHECK(D >= 1, op, ": x must have a non-empty hidden dimension, got shape ", x.sizes());
  TORCH_CHECK(H >= 1 && H <= 512, op, ": the CUDA kernels take 1 to 512 gate heads H, got ", H);
  TORCH_CHECK(hd >= 1, op, ": v must have a non-empty head dimension, got shape ", v.sizes());
  pill_cuda::check_like(op, "w_gate", w_gate, x, x.scalar_type(), {D, H});
  pill_cuda::check_like(op, "v", v, x, x.scalar_type(), {T, H, hd});
  pill_cuda::check_like(op, "image_mask", image_mask, x, at::kBool, {T});
  TORCH_CHECK(H * hd <= INT32_MAX, op, ": H * hd must fit in 32 bits, got ", H * hd);
  return {T, pill_cuda::checked_int(op, "D", D), static_cast<int>(H), static_cast<int>(hd)};
}

Tensor modality_gate_forward(const Tensor& x, const Tensor& w_gate, const Tensor& v, const Tensor& image_mask) {
  const char* op = "modality_gate_forward (CUDA)";
  const Sizes s = check_gate(op, x, w_gate, v, image_mask);
  const pill_cuda::KernelDeviceGuard guard(x);
  Tensor out = pill_cuda::new_output(v.sizes(), v.options());
  pill_cuda::check_launch(
      op, pill_cuda::modality_gate_forward(pill_cuda::dtype_of(op, x), x.data_ptr(), w_gate.data_ptr(), v.data_ptr(),
                                           image_mask.data_ptr<bool>(), out.data_ptr(), s.tokens, s.hidden, s.heads,
                                           s.head_dim, pill_cuda::kernel_stream(x)));
  return out;
}

std::tuple<Tensor, Tensor, Tensor> modality_gate_backward(const Tensor& grad_v, const Tensor& x, const Tensor& w_gate,
                                                          const Tensor& v, const Tensor& image_mask) {
  const char* op = "modality_gate_backward (CUDA)";
  const Sizes s = check_gate(op, x, w_gate, v, image_mask);
  pill_cuda::check_like(op, "grad_v", grad_v, x, x.scalar_type(), v.sizes());
  const pill_cuda::KernelDeviceGuard guard(x);
  Tensor dx = pill_cuda::new_output(x.sizes(), x.options());
  Tensor dw = pill_cuda::new_output(w_gate.sizes(), x.options());
  Tensor dv = pill_cuda::new_output(v.sizes(), v.options());
  const int splits = pill_cuda::modality_gate_backward_splits(s.tokens, s.hidden, s.heads);
  Tensor workspace = pill_cuda::float_workspace(
      x, pill_cuda::modality_gate_backward_workspace_floats(s.tokens, s.hidden, s.heads, splits));
  pill_cuda::check_launch(
      op, pill_cuda::modality_gate_backward(pill_cuda::dtype_of(op, x), grad_v.data_ptr(), x.data_ptr(),
                                            w_gate.data_ptr(), v.data_ptr(), image_mask.data_ptr<bool>(),
                                            dx.data_ptr(), dw.data_ptr(), dv.data_ptr(), workspace.data_ptr<float>(),
                                            splits, s.tokens, s.hidden, s.heads, s.head_dim,
                                            pill_cuda::kernel_stream(x)));
  return {dx, dw, dv};
}

}  // namespace

PILL_CUDA_LIBRARY_IMPL(m) {
  m.impl("modality_gate_forward", &modality_gate_forward);
  m.impl("modality_gate_backward", &modality_gate_backward);
}
