// Torch binding of the hard-routed GLU adapter CUDA kernels (csrc/routed_glu_adapter.cu): checks, output and
// workspace allocation on the current stream of x's device, launch. Built only in the CUDA build (setup.py).
#include <optional>
#include <tuple>

#include "cuda_binding_utils.h"
#include "routed_glu_adapter.h"

namespace {

using at::Tensor;

struct Sizes {
  int64_t tokens;
  int hidden, rank, experts;
};

Sizes check_routed(const char* op, const Tensor& x, const Tensor& w_down, const Tensor& w_gate, const Tensor& w_up,
                   const std::optional<Tensor>& expert_ids, const std::optional<Tensor>& norm_weight) {
  pill_cuda::check_input(op, "x", x);
  pill_cuda::dtype_of(op, x);
  TORCH_CHECK(w_down.dim() == 3, op, ": w_down must be 3-D [E, D, r], got shape ", w_down.sizes());
  const int64_t T = x.size(0), D = x.size(1), E = w_down.size(0), r = w_down.size(2);
  pill_cuda::check_rank(op, r);
  TORCH_CHECK(E >= 1 && E < 65535, op, ": the number of experts E must lie in [1, 65535), got ", E);
  pill_cuda::check_like(op, "w_down", w_down, x, x.scalar_type(), {E, D, r});
  pill_cuda::check_like(op, "w_gate", w_gate, x, x.scalar_type(), {E, D, r});
  pill_cuda::check_like(op, "w_up", w_up, x, x.scalar_type(), {E, r, D});
  if (expert_ids.has_value()) {
    pill_cuda::check_like(op, "expert_ids", *expert_ids, x, at::kLong, {T});
  } else {
    TORCH_CHECK(E == 1, op, ": expert_ids is required when there are E=", E, " experts");
  }
  if (norm_weight.has_value()) pill_cuda::check_like(op, "norm_weight", *norm_weight, x, x.scalar_type(), {D});
  TORCH_CHECK(D >= 1, op, ": x must have a non-empty hidden dimension, got shape ", x.sizes());
  return {T, pill_cuda::checked_int(op, "D", D), static_cast<int>(r), static_cast<int>(E)};
}

const int64_t* ids_ptr(const std::optional<Tensor>& ids) { return ids ? ids->data_ptr<int64_t>() : nullptr; }
const void* opt_ptr(const std::optional<Tensor>& t) { return t ? t->data_ptr() : nullptr; }

Tensor routed_glu_adapter_forward(const Tensor& x, const Tensor& w_down, const Tensor& w_gate, const Tensor& w_up,
                                  const std::optional<Tensor>& expert_ids, const std::optional<Tensor>& norm_weight,
                                  double eps) {
  const char* op = "routed_glu_adapter_forward (CUDA)";
  const Sizes s = check_routed(op, x, w_down, w_gate, w_up, expert_ids, norm_weight);
  const pill_cuda::KernelDeviceGuard guard(x);
  Tensor y = pill_cuda::new_output(x.sizes(), x.options());
  pill_cuda::check_launch(
      op, pill_cuda::routed_glu_adapter_forward(pill_cuda::dtype_of(op, x), x.data_ptr(), w_down.data_ptr(),
                                                w_gate.data_ptr(), w_up.data_ptr(), ids_ptr(expert_ids),
                                                opt_ptr(norm_weight), y.data_ptr(), s.tokens, s.hidden, s.rank,
                                                s.experts, static_cast<float>(eps),
                                                pill_cuda::kernel_stream(x)));
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> routed_glu_adapter_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& w_down, const Tensor& w_gate, const Tensor& w_up,
    const std::optional<Tensor>& expert_ids, const std::optional<Tensor>& norm_weight, double eps) {
  const char* op = "routed_glu_adapter_backward (CUDA)";
  const Sizes s = check_routed(op, x, w_down, w_gate, w_up, expert_ids, norm_weight);
  pill_cuda::check_like(op, "grad_y", grad_y, x, x.scalar_type(), x.sizes());
  const pill_cuda::KernelDeviceGuard guard(x);
  Tensor dx = pill_cuda::new_output(x.sizes(), x.options());
  Tensor dw_down = pill_cuda::new_output(w_down.sizes(), x.options());
  Tensor dw_gate = pill_cuda::new_output(w_gate.sizes(), x.options());
  Tensor dw_up = pill_cuda::new_output(w_up.sizes(), x.options());
  Tensor dnorm = pill_cuda::new_output(norm_weight ? norm_weight->sizes() : at::IntArrayRef{0}, x.options());
  const int splits = pill_cuda::routed_glu_adapter_backward_splits(s.tokens, s.hidden, s.experts);
  Tensor workspace = pill_cuda::float_workspace(
      x, pill_cuda::routed_glu_adapter_backward_workspace_floats(s.tokens, s.hidden, s.rank, s.experts, splits));
  pill_cuda::check_launch(
      op, pill_cuda::routed_glu_adapter_backward(
              pill_cuda::dtype_of(op, x), grad_y.data_ptr(), x.data_ptr(), w_down.data_ptr(), w_gate.data_ptr(),
              w_up.data_ptr(), ids_ptr(expert_ids), opt_ptr(norm_weight), dx.data_ptr(), dw_down.data_ptr(),
              dw_gate.data_ptr(), dw_up.data_ptr(), norm_weight ? dnorm.data_ptr() : nullptr,
              workspace.data_ptr<float>(), splits, s.tokens, s.hidden, s.rank, s.experts, static_cast<float>(eps),
              pill_cuda::kernel_stream(x)));
  return {dx, dw_down, dw_gate, dw_up, dnorm};
}

}  // namespace

PILL_CUDA_LIBRARY_IMPL(m) {
  m.impl("routed_glu_adapter_forward", &routed_glu_adapter_forward);
  m.impl("routed_glu_adapter_backward", &routed_glu_adapter_backward);
}
