// C++ CPU kernels of pill_kernels_C::soft_routed_adapter_{forward,backward}: LaVIN's RepAdapter router,
// z = (n W_down + b_down) * dropout_mask, y = n + scale * sum_e w[t, e] (z W_up[e] + b_up[e]),
// n = RMSNorm(x) when norm_weight is given, else x (semantics: pill_kernels/reference.py).
//
// The E up-projections of a token are one product: [w_0 z | w_1 z | ...] [W_up[0]; W_up[1]; ...], so a tile of
// tokens costs one (T x r)(r x D)-sized GEMM per expert with no per-expert output buffer. Tiles, chunking,
// deterministic weight-gradient reduction and accumulation types as in routed_glu_adapter_cpu.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <type_traits>

#include "cpu_common.h"
#include "cpu_gemm.h"

namespace pill_kernels_cpu {
namespace {

constexpr const char* kForwardOp = "soft_routed_adapter_forward";
constexpr const char* kBackwardOp = "soft_routed_adapter_backward";

struct Shapes {
  int64_t tokens, hidden, rank, experts;
  int64_t hidden_pad, rank_pad;
};

Shapes check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& b_down,
                    const at::Tensor& w_up, const at::Tensor& b_up, const at::Tensor& routing_weights,
                    const c10::optional<at::Tensor>& dropout_mask, const c10::optional<at::Tensor>& norm_weight) {
  check_float_cpu(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape [T, D], got ", x.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{w_down, "w_down"}, {b_down, "b_down"},
                                {w_up, "w_up"}, {b_up, "b_up"}, {routing_weights, "routing_weights"}})
    check_like(t, x, op, name, "x");
  TORCH_CHECK(w_down.dim() == 2, op, ": w_down must have shape [D, r], got ", w_down.sizes());
  TORCH_CHECK(w_up.dim() == 3, op, ": w_up must have shape [E, r, D], got ", w_up.sizes());
  Shapes s{};
  s.tokens = x.size(0);
  s.hidden = x.size(1);
  s.rank = w_down.size(1);
  s.experts = w_up.size(0);
  TORCH_CHECK(s.hidden > 0 && s.experts > 0 && s.rank > 0, op, ": D, E and r must be positive, got D=", s.hidden,
              " E=", s.experts, " r=", s.rank);
  check_shape(w_down, {s.hidden, s.rank}, op, "w_down", "[D, r]");
  check_shape(b_down, {s.rank}, op, "b_down", "[r]");
  check_shape(w_up, {s.experts, s.rank, s.hidden}, op, "w_up", "[E, r, D]");
  check_shape(b_up, {s.experts, s.hidden}, op, "b_up", "[E, D]");
  check_shape(routing_weights, {s.tokens, s.experts}, op, "routing_weights", "[T, E]");
  if (dropout_mask.has_value()) {
    check_like(*dropout_mask, x, op, "dropout_mask", "x");
    check_shape(*dropout_mask, {s.tokens, s.rank}, op, "dropout_mask", "[T, r]");
  }
  if (norm_weight.has_value()) {
    check_like(*norm_weight, x, op, "norm_weight", "x");
    check_shape(*norm_weight, {s.hidden}, op, "norm_weight", "[D]");
  }
  s.hidden_pad = round_up(s.hidden, kGemmColAlign);
  s.rank_pad = round_up(s.rank, kGemmColAlign);
  return s;
}

// Weights as the tile GEMMs read them, in acc_t with zero padding: down [D][r] with leading dimension ld_down;
// up [E*rp][ld_up] (the experts stacked along K); for the backward down_t [rp][Dp] and up_t [D][E*rp]. When the
// weights already are acc_t and r and D are multiples of kGemmColAlign, down and up are the caller's tensors.
template <typename scalar_t, typename acc_t>
struct PackedWeights {
  std::unique_ptr<acc_t[]> down_packed, up_packed, down_t, up_t;
  const acc_t* down;
  const acc_t* up;
  int64_t ld_down, ld_up;
  std::vector<acc_t> b_down, b_up;

  PackedWeights(const Shapes& s, const at::Tensor& w_down, const at::Tensor& bd, const at::Tensor& w_up,
                const at::Tensor& bu, bool for_backward) {
    const int64_t D = s.hidden, r = s.rank, rp = s.rank_pad, Dp = s.hidden_pad, E = s.experts;
    const scalar_t* wd = w_down.data_ptr<scalar_t>();
    const scalar_t* wu = w_up.data_ptr<scalar_t>();
    if (std::is_same<scalar_t, acc_t>::value && r == rp && D == Dp) {
      down = reinterpret_cast<const acc_t*>(wd);
      up = reinterpret_cast<const acc_t*>(wu);
      ld_down = r;
      ld_up = D;
    } else {
      down_packed = scratch<acc_t>(D * rp);
      std::fill(down_packed.get(), down_packed.get() + D * rp, acc_t(0));
      pack(wd, D, r, false, down_packed.get(), rp);
      up_packed = scratch<acc_t>(E * rp * Dp);
      std::fill(up_packed.get(), up_packed.get() + E * rp * Dp, acc_t(0));
      for (int64_t e = 0; e < E; ++e) pack(wu + e * r * D, r, D, false, up_packed.get() + e * rp * Dp, Dp);
      down = down_packed.get();
      up = up_packed.get();
      ld_down = rp;
      ld_up = Dp;
    }
    if (for_backward) {
      down_t = scratch<acc_t>(rp * Dp);
      std::fill(down_t.get(), down_t.get() + rp * Dp, acc_t(0));
      pack(wd, D, r, true, down_t.get(), Dp);
      up_t = scratch<acc_t>(D * E * rp);
      std::fill(up_t.get(), up_t.get() + D * E * rp, acc_t(0));
      for (int64_t e = 0; e < E; ++e) pack(wu + e * r * D, r, D, true, up_t.get() + e * rp, E * rp);
    }
    b_down.assign(static_cast<size_t>(rp), acc_t(0));
    const scalar_t* bd_ptr = bd.data_ptr<scalar_t>();
    for (int64_t j = 0; j < r; ++j) b_down[j] = static_cast<acc_t>(bd_ptr[j]);
    b_up = to_acc<scalar_t, acc_t>(bu);
  }
};

// Loads the tile's rows [t0, t0 + count) of x into n (normalised when weight != nullptr), zero-filling the
// padding columns and the rows up to rows_pad.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* x, int64_t t0, int64_t count, int64_t rows_pad, int64_t D, int64_t ld,
               const acc_t* weight, double eps, acc_t* n, acc_t* xr, acc_t* rstd) {
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* row = x + (t0 + i) * D;
    if (weight != nullptr) {
      rstd[i] = rms_norm_row<scalar_t, acc_t>(row, weight, D, eps, n + i * ld, xr != nullptr ? xr + i * ld : nullptr);
    } else {
      for (int64_t k = 0; k < D; ++k) n[i * ld + k] = static_cast<acc_t>(row[k]);
    }
    std::fill(n + i * ld + D, n + (i + 1) * ld, acc_t(0));
  }
  std::fill(n + count * ld, n + rows_pad * ld, acc_t(0));
}

// z[i][j] = (pre-activation + b_down) * mask for the tile; the padding columns stay zero.
template <typename scalar_t, typename acc_t>
void finish_down(acc_t* z, int64_t t0, int64_t count, int64_t rows, const Shapes& s, const acc_t* b_down,
                 const scalar_t* mask) {
  const int64_t r = s.rank, rp = s.rank_pad;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < rp; ++j) {
      acc_t v = i < count ? z[i * rp + j] + b_down[j] : acc_t(0);
      if (mask != nullptr && i < count && j < r) v *= static_cast<acc_t>(mask[(t0 + i) * r + j]);
      z[i * rp + j] = v;
    }
}

template <typename scalar_t>
void forward_kernel(const Shapes& s, const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& b_down,
                    const at::Tensor& w_up, const at::Tensor& b_up, const at::Tensor& routing_weights,
                    const c10::optional<at::Tensor>& dropout_mask, const c10::optional<at::Tensor>& norm_weight,
                    double eps, double scale, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const GemmFn<acc_t> gemm = select_gemm<acc_t>();
  const int64_t D = s.hidden, rp = s.rank_pad, Dp = s.hidden_pad, E = s.experts, T = s.tokens;
  const PackedWeights<scalar_t, acc_t> packed(s, w_down, b_down, w_up, b_up, /*for_backward=*/false);
  std::vector<acc_t> weight;
  if (norm_weight.has_value()) weight = to_acc<scalar_t, acc_t>(*norm_weight);
  const acc_t* weight_ptr = norm_weight.has_value() ? weight.data() : nullptr;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* w_ptr = routing_weights.data_ptr<scalar_t>();
  const scalar_t* mask_ptr = dropout_mask.has_value() ? dropout_mask->data_ptr<scalar_t>() : nullptr;
  scalar_t* y_ptr = y.data_ptr<scalar_t>();
  const acc_t s_acc = static_cast<acc_t>(scale);

  at::parallel_for(0, (T + kTileTokens - 1) / kTileTokens, 1, [&](int64_t tile_begin, int64_t tile_end) {
    auto n = scratch<acc_t>(kTileTokens * Dp);
    auto z = scratch<acc_t>(kTileTokens * rp);
    auto zw = scratch<acc_t>(kTileTokens * E * rp);
    auto out = scratch<acc_t>(kTileTokens * Dp);
    acc_t rstd[kTileTokens];
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t t0 = tile * kTileTokens, count = std::min(kTileTokens, T - t0);
      const int64_t rows = round_up(count, kGemmRowAlign);
      load_rows<scalar_t, acc_t>(x_ptr, t0, count, rows, D, Dp, weight_ptr, eps, n.get(), nullptr, rstd);
      gemm(false, rows, rp, D, n.get(), Dp, 1, packed.down, packed.ld_down, z.get(), rp);
      finish_down<scalar_t, acc_t>(z.get(), t0, count, rows, s, packed.b_down.data(), mask_ptr);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t e = 0; e < E; ++e) {
          const acc_t w = i < count ? static_cast<acc_t>(w_ptr[(t0 + i) * E + e]) : acc_t(0);
          for (int64_t j = 0; j < rp; ++j) zw[(i * E + e) * rp + j] = w * z[i * rp + j];
        }
      gemm(false, rows, Dp, E * rp, zw.get(), E * rp, 1, packed.up, packed.ld_up, out.get(), Dp);
      for (int64_t i = 0; i < count; ++i) {
        acc_t* out_row = out.get() + i * Dp;
        for (int64_t e = 0; e < E; ++e) {
          const acc_t w = static_cast<acc_t>(w_ptr[(t0 + i) * E + e]);
          const acc_t* bias = packed.b_up.data() + e * D;
          for (int64_t k = 0; k < D; ++k) out_row[k] += w * bias[k];
        }
        scalar_t* y_row = y_ptr + (t0 + i) * D;
        for (int64_t k = 0; k < D; ++k) y_row[k] = static_cast<scalar_t>(n[i * Dp + k] + s_acc * out_row[k]);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Shapes& s, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_down,
                     const at::Tensor& b_down, const at::Tensor& w_up, const at::Tensor& b_up,
                     const at::Tensor& routing_weights, const c10::optional<at::Tensor>& dropout_mask,
                     const c10::optional<at::Tensor>& norm_weight, double eps, double scale, at::Tensor& dx,
                     at::Tensor& dw_down, at::Tensor& db_down, at::Tensor& dw_up, at::Tensor& db_up,
                     at::Tensor& drouting, at::Tensor& dnorm) {
  using acc_t = at::opmath_type<scalar_t>;
  const GemmFn<acc_t> gemm = select_gemm<acc_t>();
  const int64_t D = s.hidden, r = s.rank, rp = s.rank_pad, Dp = s.hidden_pad, E = s.experts, T = s.tokens;
  const int64_t Er = E * rp;
  const PackedWeights<scalar_t, acc_t> packed(s, w_down, b_down, w_up, b_up, /*for_backward=*/true);
  const bool has_norm = norm_weight.has_value();
  std::vector<acc_t> weight;
  if (has_norm) weight = to_acc<scalar_t, acc_t>(*norm_weight);
  const acc_t* weight_ptr = has_norm ? weight.data() : nullptr;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* gy_ptr = grad_y.data_ptr<scalar_t>();
  const scalar_t* w_ptr = routing_weights.data_ptr<scalar_t>();
  const scalar_t* mask_ptr = dropout_mask.has_value() ? dropout_mask->data_ptr<scalar_t>() : nullptr;
  scalar_t* dx_ptr = dx.data_ptr<scalar_t>();
  scalar_t* dw_routing_ptr = drouting.data_ptr<scalar_t>();
  const acc_t s_acc = static_cast<acc_t>(scale);

  // Per-chunk partials: d down [Dp][rp], d b_down [rp], d up [E*rp][Dp], d b_up [E][D], d norm weight [D].
  const int64_t off_bd = Dp * rp, off_up = off_bd + rp, off_bu = off_up + Er * Dp, off_norm = off_bu + E * D;
  const int64_t part_size = off_norm + (has_norm ? D : 0);
  const int64_t per_chunk = chunk_tokens(T);
  const int64_t num_chunks = (T + per_chunk - 1) / per_chunk;
  auto partials = scratch<acc_t>(num_chunks * part_size);

  at::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    auto n = scratch<acc_t>(kTileTokens * Dp);
    auto xr = scratch<acc_t>(has_norm ? kTileTokens * Dp : 0);
    auto gy = scratch<acc_t>(kTileTokens * Dp);
    auto gs = scratch<acc_t>(kTileTokens * Dp);
    auto z = scratch<acc_t>(kTileTokens * rp);
    auto zw = scratch<acc_t>(kTileTokens * Er);
    auto proj = scratch<acc_t>(kTileTokens * Er);
    auto dpre = scratch<acc_t>(kTileTokens * rp);
    auto dn = scratch<acc_t>(kTileTokens * Dp);
    acc_t rstd[kTileTokens];
    for (int64_t c = c_begin; c < c_end; ++c) {
      acc_t* part = partials.get() + c * part_size;
      // The chunk's first tile overwrites the GEMM-accumulated partials (d W_down, d W_up); the rest is summed
      // with +=.
      std::fill(part + off_bd, part + off_up, acc_t(0));
      std::fill(part + off_bu, part + part_size, acc_t(0));
      const int64_t chunk_end = std::min(T, (c + 1) * per_chunk);
      for (int64_t t0 = c * per_chunk; t0 < chunk_end; t0 += kTileTokens) {
        const int64_t count = std::min(kTileTokens, chunk_end - t0);
        const int64_t rows = round_up(count, kGemmRowAlign);
        load_rows<scalar_t, acc_t>(x_ptr, t0, count, rows, D, Dp, weight_ptr, eps, n.get(), xr.get(), rstd);
        load_rows<scalar_t, acc_t>(gy_ptr, t0, count, rows, D, Dp, nullptr, eps, gy.get(), nullptr, nullptr);
        for (int64_t i = 0; i < rows * Dp; ++i) gs[i] = s_acc * gy[i];
        gemm(false, rows, rp, D, n.get(), Dp, 1, packed.down, packed.ld_down, z.get(), rp);
        finish_down<scalar_t, acc_t>(z.get(), t0, count, rows, s, packed.b_down.data(), mask_ptr);
        // proj[i][e*rp + j] = (scale gy_i) . W_up[e][j, :]
        gemm(false, rows, Er, D, gs.get(), Dp, 1, packed.up_t.get(), Er, proj.get(), Er);
        for (int64_t i = 0; i < count; ++i) {
          const int64_t t = t0 + i;
          const acc_t* gs_row = gs.get() + i * Dp;
          for (int64_t e = 0; e < E; ++e) {
            const acc_t w = static_cast<acc_t>(w_ptr[t * E + e]);
            const acc_t* bias = packed.b_up.data() + e * D;
            acc_t* d_bias = part + off_bu + e * D;
            acc_t dw = 0;
            for (int64_t j = 0; j < rp; ++j) {
              dw += z[i * rp + j] * proj[i * Er + e * rp + j];
              zw[i * Er + e * rp + j] = w * z[i * rp + j];
            }
            for (int64_t k = 0; k < D; ++k) {
              dw += gs_row[k] * bias[k];
              d_bias[k] += w * gs_row[k];
            }
            dw_routing_ptr[t * E + e] = static_cast<scalar_t>(dw);
          }
          for (int64_t j = 0; j < rp; ++j) {
            acc_t dz = 0;
            for (int64_t e = 0; e < E; ++e) dz += static_cast<acc_t>(w_ptr[t * E + e]) * proj[i * Er + e * rp + j];
            if (mask_ptr != nullptr) dz *= j < r ? static_cast<acc_t>(mask_ptr[t * r + j]) : acc_t(0);
            dpre[i * rp + j] = dz;
            part[off_bd + j] += dz;
          }
        }
        std::fill(dpre.get() + count * rp, dpre.get() + rows * rp, acc_t(0));
        const bool accumulate = t0 != c * per_chunk;
        gemm(accumulate, Er, Dp, count, zw.get(), 1, Er, gs.get(), Dp, part + off_up, Dp);
        gemm(accumulate, Dp, rp, count, n.get(), 1, Dp, dpre.get(), rp, part, rp);
        // dn = gy (the skip) + dpre W_down^T.
        gemm(false, rows, Dp, rp, dpre.get(), rp, 1, packed.down_t.get(), Dp, dn.get(), Dp);
        for (int64_t i = 0; i < count; ++i) {
          acc_t* dn_row = dn.get() + i * Dp;
          for (int64_t k = 0; k < D; ++k) dn_row[k] += gy[i * Dp + k];
          scalar_t* dx_row = dx_ptr + (t0 + i) * D;
          if (has_norm) {
            rms_norm_row_backward<scalar_t, acc_t>(dn_row, xr.get() + i * Dp, rstd[i], weight_ptr, D, dx_row,
                                                   part + off_norm);
          } else {
            for (int64_t k = 0; k < D; ++k) dx_row[k] = static_cast<scalar_t>(dn_row[k]);
          }
        }
      }
    }
  });

  // Chunk partials summed in chunk order; parallel over rows of the gradients, each a contiguous vector:
  // D rows of d W_down, E * r rows of d W_up, then d b_down, d b_up and d norm weight.
  scalar_t* dwd = dw_down.data_ptr<scalar_t>();
  scalar_t* dbd = db_down.data_ptr<scalar_t>();
  scalar_t* dwu = dw_up.data_ptr<scalar_t>();
  scalar_t* dbu = db_up.data_ptr<scalar_t>();
  std::vector<int64_t> chunks(static_cast<size_t>(num_chunks));
  for (int64_t c = 0; c < num_chunks; ++c) chunks[c] = c;
  const int64_t up_rows = E * r;
  at::parallel_for(0, D + up_rows + 1, 8, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> sum(static_cast<size_t>(std::max({rp, Dp, E * D})));
    auto reduce = [&](int64_t offset, int64_t size) {
      sum_partials(partials.get() + offset, part_size, chunks.data(), num_chunks, size, sum.data());
    };
    for (int64_t row = row_begin; row < row_end; ++row) {
      if (row < D) {
        reduce(row * rp, r);
        for (int64_t j = 0; j < r; ++j) dwd[row * r + j] = static_cast<scalar_t>(sum[j]);
      } else if (row < D + up_rows) {
        const int64_t e = (row - D) / r, j = (row - D) % r;
        reduce(off_up + (e * rp + j) * Dp, D);
        for (int64_t k = 0; k < D; ++k) dwu[(e * r + j) * D + k] = static_cast<scalar_t>(sum[k]);
      } else {
        reduce(off_bd, r);
        for (int64_t j = 0; j < r; ++j) dbd[j] = static_cast<scalar_t>(sum[j]);
        reduce(off_bu, E * D);
        for (int64_t i = 0; i < E * D; ++i) dbu[i] = static_cast<scalar_t>(sum[i]);
        if (has_norm) {
          reduce(off_norm, D);
          scalar_t* dnw = dnorm.data_ptr<scalar_t>();
          for (int64_t k = 0; k < D; ++k) dnw[k] = static_cast<scalar_t>(sum[k]);
        }
      }
    }
  });
}

at::Tensor soft_routed_adapter_forward_cpu(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& b_down,
                                           const at::Tensor& w_up, const at::Tensor& b_up,
                                           const at::Tensor& routing_weights,
                                           const c10::optional<at::Tensor>& dropout_mask,
                                           const c10::optional<at::Tensor>& norm_weight, double eps, double scale) {
  const Shapes s = check_inputs(kForwardOp, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kForwardOp, [&] {
    forward_kernel<scalar_t>(s, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale,
                             y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
soft_routed_adapter_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_down,
                                 const at::Tensor& b_down, const at::Tensor& w_up, const at::Tensor& b_up,
                                 const at::Tensor& routing_weights, const c10::optional<at::Tensor>& dropout_mask,
                                 const c10::optional<at::Tensor>& norm_weight, double eps, double scale) {
  const Shapes s =
      check_inputs(kBackwardOp, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight);
  check_like(grad_y, x, kBackwardOp, "grad_y", "x");
  check_shape(grad_y, x.sizes(), kBackwardOp, "grad_y", "x.shape");
  at::Tensor dx = at::empty_like(x), dw_down = at::empty_like(w_down), db_down = at::empty_like(b_down);
  at::Tensor dw_up = at::empty_like(w_up), db_up = at::empty_like(b_up), drouting = at::empty_like(routing_weights);
  at::Tensor dnorm = norm_weight.has_value() ? at::empty_like(*norm_weight) : x.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBackwardOp, [&] {
    backward_kernel<scalar_t>(s, grad_y, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight,
                              eps, scale, dx, dw_down, db_down, dw_up, db_up, drouting, dnorm);
  });
  return {dx, dw_down, db_down, dw_up, db_up, drouting, dnorm};
}

}  // namespace
}  // namespace pill_kernels_cpu

TORCH_LIBRARY_IMPL(pill_kernels_C, CPU, m) {
  m.impl("soft_routed_adapter_forward", &pill_kernels_cpu::soft_routed_adapter_forward_cpu);
  m.impl("soft_routed_adapter_backward", &pill_kernels_cpu::soft_routed_adapter_backward_cpu);
}
