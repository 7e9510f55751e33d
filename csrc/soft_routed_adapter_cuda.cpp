// Torch binding of the soft-routed adapter CUDA kernels (csrc/soft_routed_adapter.cu): checks, output and
// workspace allocation on the current stream of x's device, launch. Built only in the CUDA build (setup.py).
#include <optional>
#include <tuple>

#include "cuda_binding_utils.h"
#include "soft_routed_adapter.h"

namespace {

using at::Tensor;

struct Sizes {
  int64_t tokens;
  int hidden, rank, experts;
};

Sizes check_soft(const char* op, const Tensor& x, const Tensor& w_down, const Tensor& b_down, const Tensor& w_up,
                 const Tensor& b_up, const Tensor& routing_weights, const std::optional<Tensor>& dropout_mask,
                 const std::optional<Tensor>& norm_weight) {
  pill_cuda::check_input(op, "x", x);
  pill_cuda::dtype_of(op, x);
  TORCH_CHECK(w_down.dim() == 2, op, ": w_down must be 2-D [D, r], got shape ", w_down.sizes());
  TORCH_CHECK(w_up.dim() == 3, op, ": w_up must be 3-D [E, r, D], got shape ", w_up.sizes());
  const int64_t T = x.size(0), D = x.size(1), r = w_down.size(1), E = w_up.size(0);
  pill_cuda::check_rank(op, r);
  TORCH_CHECK(E >= 1 && E < 65535, op, ": the number of experts E must lie in [1, 65535), got ", E);
  TORCH_CHECK(D >= 1, op, ": x must have a non-empty hidden dimension, got shape ", x.sizes());
  const auto dt = x.scalar_type();
  pill_cuda::check_like(op, "w_down", w_down, x, dt, {D, r});
  pill_cuda::check_like(op, "b_down", b_down, x, dt, {r});
  pill_cuda::check_like(op, "w_up", w_up, x, dt, {E, r, D});
  pill_cuda::check_like(op, "b_up", b_up, x, dt, {E, D});
  pill_cuda::check_like(op, "routing_weights", routing_weights, x, dt, {T, E});
  if (dropout_mask) pill_cuda::check_like(op, "dropout_mask", *dropout_mask, x, dt, {T, r});
  if (norm_weight) pill_cuda::check_like(op, "norm_weight", *norm_weight, x, dt, {D});
  return {T, pill_cuda::checked_int(op, "D", D), static_cast<int>(r), static_cast<int>(E)};
}

const void* opt_ptr(const std::optional<Tensor>& t) { return t ? t->data_ptr() : nullptr; }

Tensor soft_routed_adapter_forward(const Tensor& x, const Tensor& w_down, const Tensor& b_down, const Tensor& w_up,
                                   const Tensor& b_up, const Tensor& routing_weights,
                                   const std::optional<Tensor>& dropout_mask, const std::optional<Tensor>& norm_weight,
                                   double eps, double scale) {
  const char* op = "soft_routed_adapter_forward (CUDA)";
  const Sizes s = check_soft(op, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight);
  const pill_cuda::KernelDeviceGuard guard(x);
  Tensor y = pill_cuda::new_output(x.sizes(), x.options());
  pill_cuda::check_launch(
      op, pill_cuda::soft_routed_adapter_forward(
              pill_cuda::dtype_of(op, x), x.data_ptr(), w_down.data_ptr(), b_down.data_ptr(), w_up.data_ptr(),
              b_up.data_ptr(), routing_weights.data_ptr(), opt_ptr(dropout_mask), opt_ptr(norm_weight), y.data_ptr(),
              s.tokens, s.hidden, s.rank, s.experts, static_cast<float>(eps), static_cast<float>(scale),
              pill_cuda::kernel_stream(x)));
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> soft_routed_adapter_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& w_down, const Tensor& b_down, const Tensor& w_up,
    const Tensor& b_up, const Tensor& routing_weights, const std::optional<Tensor>& dropout_mask,
    const std::optional<Tensor>& norm_weight, double eps, double scale) {
  const char* op = "soft_routed_adapter_backward (CUDA)";
  const Sizes s = check_soft(op, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight);
  pill_cuda::check_like(op, "grad_y", grad_y, x, x.scalar_type(), x.sizes());
  const pill_cuda::KernelDeviceGuard guard(x);
  Tensor dx = pill_cuda::new_output(x.sizes(), x.options());
  Tensor dw_down = pill_cuda::new_output(w_down.sizes(), x.options());
  Tensor db_down = pill_cuda::new_output(b_down.sizes(), x.options());
  Tensor dw_up = pill_cuda::new_output(w_up.sizes(), x.options());
  Tensor db_up = pill_cuda::new_output(b_up.sizes(), x.options());
  Tensor drouting = pill_cuda::new_output(routing_weights.sizes(), x.options());
  Tensor dnorm = pill_cuda::new_output(norm_weight ? norm_weight->sizes() : at::IntArrayRef{0}, x.options());
  const int splits = pill_cuda::soft_routed_adapter_backward_splits(s.tokens, s.hidden, s.experts);
  Tensor workspace = pill_cuda::float_workspace(
      x, pill_cuda::soft_routed_adapter_backward_workspace_floats(s.tokens, s.hidden, s.rank, s.experts, splits));
  pill_cuda::check_launch(
      op, pill_cuda::soft_routed_adapter_backward(
              pill_cuda::dtype_of(op, x), grad_y.data_ptr(), x.data_ptr(), w_down.data_ptr(), b_down.data_ptr(),
              w_up.data_ptr(), b_up.data_ptr(), routing_weights.data_ptr(), opt_ptr(dropout_mask),
              opt_ptr(norm_weight), dx.data_ptr(), dw_down.data_ptr(), db_down.data_ptr(), dw_up.data_ptr(),
              db_up.data_ptr(), drouting.data_ptr(), norm_weight ? dnorm.data_ptr() : nullptr,
              workspace.data_ptr<float>(), splits, s.tokens, s.hidden, s.rank, s.experts, static_cast<float>(eps),
              static_cast<float>(scale), pill_cuda::kernel_stream(x)));
  return {dx, dw_down, db_down, dw_up, db_up, drouting, dnorm};
}

}  // namespace

PILL_CUDA_LIBRARY_IMPL(m) {
  m.impl("soft_routed_adapter_forward", &soft_routed_adapter_forward);
  m.impl("soft_routed_adapter_backward", &soft_routed_adapter_backward);
}
