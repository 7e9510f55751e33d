// C++ CPU kernels of pill_kernels_C::modality_gate_{forward,backward}: PILL's modality attention gate,
// v_out[t, h, :] = v[t, h, :] * tanh(x[t] . w_gate[:, h]) for image tokens, v[t] unchanged for text tokens
// (semantics: pill_kernels/reference.py).
//
// Only image tokens compute gate logits: they are gathered in tiles and their logits are one small GEMM per tile
// (cpu_gemm.h); text tokens are copies (forward) or zero dx (backward). w_gate's gradient is summed per fixed
// chunk of image tokens and reduced in chunk order (cpu_common.h), hence deterministic for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cpu_common.h"
#include "cpu_gemm.h"

namespace pill_kernels_cpu {
namespace {

constexpr const char* kForwardOp = "modality_gate_forward";
constexpr const char* kBackwardOp = "modality_gate_backward";

struct Shapes {
  int64_t tokens, hidden, heads, head_dim;
  int64_t hidden_pad, heads_pad;
};

Shapes check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& v,
                    const at::Tensor& image_mask) {
  check_float_cpu(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape [T, D], got ", x.sizes());
  check_like(w_gate, x, op, "w_gate", "x");
  check_like(v, x, op, "v", "x");
  TORCH_CHECK(w_gate.dim() == 2, op, ": w_gate must have shape [D, Hg], got ", w_gate.sizes());
  TORCH_CHECK(v.dim() == 3, op, ": v must have shape [T, Hg, hd], got ", v.sizes());
  Shapes s{};
  s.tokens = x.size(0);
  s.hidden = x.size(1);
  s.heads = w_gate.size(1);
  s.head_dim = v.size(2);
  TORCH_CHECK(s.hidden > 0 && s.heads > 0, op, ": D and Hg must be positive, got D=", s.hidden, " Hg=", s.heads);
  check_shape(w_gate, {s.hidden, s.heads}, op, "w_gate", "[D, Hg]");
  check_shape(v, {s.tokens, s.heads, s.head_dim}, op, "v", "[T, Hg, hd]");
  TORCH_CHECK(image_mask.device().is_cpu(), op, ": image_mask must be a CPU tensor, got ", image_mask.device());
  TORCH_CHECK(image_mask.scalar_type() == at::kBool, op, ": image_mask must be bool, got ", image_mask.scalar_type());
  TORCH_CHECK(image_mask.is_contiguous(), op, ": image_mask must be contiguous");
  check_shape(image_mask, {s.tokens}, op, "image_mask", "[T]");
  s.hidden_pad = round_up(s.hidden, kGemmColAlign);
  s.heads_pad = round_up(s.heads, kGemmColAlign);
  return s;
}

std::vector<int64_t> image_tokens(const at::Tensor& image_mask) {
  const bool* mask = image_mask.data_ptr<bool>();
  std::vector<int64_t> tokens;
  for (int64_t t = 0; t < image_mask.numel(); ++t)
    if (mask[t]) tokens.push_back(t);
  return tokens;
}

// Gate logits of the image tokens tokens[0:count]: x rows gathered into xt [rows][Dp] (zero padding), then
// logits [rows][Hp] = xt w_gate.
template <typename scalar_t, typename acc_t>
void tile_logits(const Shapes& s, const scalar_t* x, const int64_t* tokens, int64_t count, int64_t rows,
                 const acc_t* w_packed, GemmFn<acc_t> gemm, acc_t* xt, acc_t* logits) {
  const int64_t D = s.hidden, Dp = s.hidden_pad, Hp = s.heads_pad;
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* row = x + tokens[i] * D;
    for (int64_t k = 0; k < D; ++k) xt[i * Dp + k] = static_cast<acc_t>(row[k]);
    std::fill(xt + i * Dp + D, xt + (i + 1) * Dp, acc_t(0));
  }
  std::fill(xt + count * Dp, xt + rows * Dp, acc_t(0));
  gemm(false, rows, Hp, D, xt, Dp, 1, w_packed, Hp, logits, Hp);
}

template <typename scalar_t>
void forward_kernel(const Shapes& s, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& v,
                    const at::Tensor& image_mask, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const GemmFn<acc_t> gemm = select_gemm<acc_t>();
  const int64_t D = s.hidden, H = s.heads, hd = s.head_dim, Dp = s.hidden_pad, Hp = s.heads_pad;
  auto w_packed = scratch<acc_t>(D * Hp);
  std::fill(w_packed.get(), w_packed.get() + D * Hp, acc_t(0));
  pack(w_gate.data_ptr<scalar_t>(), D, H, false, w_packed.get(), Hp);
  const std::vector<int64_t> images = image_tokens(image_mask);
  const bool* mask = image_mask.data_ptr<bool>();
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t row = H * hd;

  at::parallel_for(0, s.tokens, 64, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t)
      if (!mask[t]) std::copy(v_ptr + t * row, v_ptr + (t + 1) * row, out_ptr + t * row);
  });
  const int64_t num_images = static_cast<int64_t>(images.size());
  at::parallel_for(0, (num_images + kTileTokens - 1) / kTileTokens, 1, [&](int64_t tile_begin, int64_t tile_end) {
    auto xt = scratch<acc_t>(kTileTokens * Dp);
    auto logits = scratch<acc_t>(kTileTokens * Hp);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t p = tile * kTileTokens, count = std::min(kTileTokens, num_images - p);
      const int64_t* tokens = images.data() + p;
      tile_logits<scalar_t, acc_t>(s, x_ptr, tokens, count, round_up(count, kGemmRowAlign), w_packed.get(), gemm,
                                   xt.get(), logits.get());
      for (int64_t i = 0; i < count; ++i) {
        const int64_t t = tokens[i];
        for (int64_t h = 0; h < H; ++h) {
          const acc_t gate = std::tanh(logits[i * Hp + h]);
          for (int64_t d = 0; d < hd; ++d) {
            const int64_t at_index = (t * H + h) * hd + d;
            out_ptr[at_index] = static_cast<scalar_t>(static_cast<acc_t>(v_ptr[at_index]) * gate);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Shapes& s, const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& w_gate,
                     const at::Tensor& v, const at::Tensor& image_mask, at::Tensor& dx, at::Tensor& dw,
                     at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const GemmFn<acc_t> gemm = select_gemm<acc_t>();
  const int64_t D = s.hidden, H = s.heads, hd = s.head_dim, Dp = s.hidden_pad, Hp = s.heads_pad;
  auto w_packed = scratch<acc_t>(D * Hp);
  std::fill(w_packed.get(), w_packed.get() + D * Hp, acc_t(0));
  pack(w_gate.data_ptr<scalar_t>(), D, H, false, w_packed.get(), Hp);
  auto w_packed_t = scratch<acc_t>(Hp * Dp);
  std::fill(w_packed_t.get(), w_packed_t.get() + Hp * Dp, acc_t(0));
  pack(w_gate.data_ptr<scalar_t>(), D, H, true, w_packed_t.get(), Dp);
  const std::vector<int64_t> images = image_tokens(image_mask);
  const bool* mask = image_mask.data_ptr<bool>();
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v.data_ptr<scalar_t>();
  const scalar_t* gv_ptr = grad_v.data_ptr<scalar_t>();
  scalar_t* dx_ptr = dx.data_ptr<scalar_t>();
  scalar_t* dv_ptr = dv.data_ptr<scalar_t>();
  const int64_t row = H * hd;

  // Text tokens: the gate is 1, so dv = grad_v and x gets no gradient.
  at::parallel_for(0, s.tokens, 64, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t)
      if (!mask[t]) {
        std::copy(gv_ptr + t * row, gv_ptr + (t + 1) * row, dv_ptr + t * row);
        std::fill(dx_ptr + t * D, dx_ptr + (t + 1) * D, scalar_t(0));
      }
  });

  const int64_t num_images = static_cast<int64_t>(images.size());
  const int64_t per_chunk = chunk_tokens(num_images);
  const int64_t num_chunks = (num_images + per_chunk - 1) / per_chunk;
  const int64_t part_size = Dp * Hp;
  auto partials = scratch<acc_t>(num_chunks * part_size);
  at::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    auto xt = scratch<acc_t>(kTileTokens * Dp);
    auto logits = scratch<acc_t>(kTileTokens * Hp);
    auto dlogits = scratch<acc_t>(kTileTokens * Hp);
    auto dxt = scratch<acc_t>(kTileTokens * Dp);
    for (int64_t c = c_begin; c < c_end; ++c) {
      acc_t* part = partials.get() + c * part_size;
      const int64_t chunk_end = std::min(num_images, (c + 1) * per_chunk);
      for (int64_t p = c * per_chunk; p < chunk_end; p += kTileTokens) {
        const int64_t count = std::min(kTileTokens, chunk_end - p), rows = round_up(count, kGemmRowAlign);
        const int64_t* tokens = images.data() + p;
        tile_logits<scalar_t, acc_t>(s, x_ptr, tokens, count, rows, w_packed.get(), gemm, xt.get(), logits.get());
        std::fill(dlogits.get(), dlogits.get() + rows * Hp, acc_t(0));
        for (int64_t i = 0; i < count; ++i) {
          const int64_t t = tokens[i];
          for (int64_t h = 0; h < H; ++h) {
            const acc_t gate = std::tanh(logits[i * Hp + h]);
            acc_t dgate = 0;
            for (int64_t d = 0; d < hd; ++d) {
              const int64_t at_index = (t * H + h) * hd + d;
              const acc_t g = static_cast<acc_t>(gv_ptr[at_index]);
              dgate += g * static_cast<acc_t>(v_ptr[at_index]);
              dv_ptr[at_index] = static_cast<scalar_t>(g * gate);
            }
            dlogits[i * Hp + h] = dgate * (acc_t(1) - gate * gate);
          }
        }
        // The chunk's first tile overwrites the partial, later tiles add to it.
        gemm(p != c * per_chunk, Dp, Hp, count, xt.get(), 1, Dp, dlogits.get(), Hp, part, Hp);
        gemm(false, rows, Dp, Hp, dlogits.get(), Hp, 1, w_packed_t.get(), Dp, dxt.get(), Dp);
        for (int64_t i = 0; i < count; ++i) {
          scalar_t* dx_row = dx_ptr + tokens[i] * D;
          for (int64_t k = 0; k < D; ++k) dx_row[k] = static_cast<scalar_t>(dxt[i * Dp + k]);
        }
      }
    }
  });

  scalar_t* dw_ptr = dw.data_ptr<scalar_t>();
  at::parallel_for(0, D, 64, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; ++k)
      for (int64_t h = 0; h < H; ++h) {
        acc_t sum = 0;
        for (int64_t c = 0; c < num_chunks; ++c) sum += partials[c * part_size + k * Hp + h];
        dw_ptr[k * H + h] = static_cast<scalar_t>(sum);
      }
  });
}

at::Tensor modality_gate_forward_cpu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& v,
                                     const at::Tensor& image_mask) {
  const Shapes s = check_inputs(kForwardOp, x, w_gate, v, image_mask);
  at::Tensor out = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kForwardOp, [&] {
    forward_kernel<scalar_t>(s, x, w_gate, v, image_mask, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modality_gate_backward_cpu(const at::Tensor& grad_v,
                                                                          const at::Tensor& x,
                                                                          const at::Tensor& w_gate,
                                                                          const at::Tensor& v,
                                                                          const at::Tensor& image_mask) {
  const Shapes s = check_inputs(kBackwardOp, x, w_gate, v, image_mask);
  check_like(grad_v, x, kBackwardOp, "grad_v", "x");
  check_shape(grad_v, v.sizes(), kBackwardOp, "grad_v", "v.shape");
  at::Tensor dx = at::empty_like(x), dw = at::empty_like(w_gate), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBackwardOp, [&] {
    backward_kernel<scalar_t>(s, grad_v, x, w_gate, v, image_mask, dx, dw, dv);
  });
  return {dx, dw, dv};
}

}  // namespace
}  // namespace pill_kernels_cpu

TORCH_LIBRARY_IMPL(pill_kernels_C, CPU, m) {
  m.impl("modality_gate_forward", &pill_kernels_cpu::modality_gate_forward_cpu);
  m.impl("modality_gate_backward", &pill_kernels_cpu::modality_gate_backward_cpu);
}
