// C++ CPU kernels of pill_kernels_C::routed_glu_adapter_{forward,backward}: hard-routed GLU adapter experts
// with their input skip, y[t] = n[t] + W_up_e(SiLU(n[t] W_gate_e) * (n[t] W_down_e)), e = expert_ids[t],
// n = RMSNorm(x) when norm_weight is given, else x (semantics: pill_kernels/reference.py).
//
// Tokens are sorted by expert (counting sort) and processed in tiles of kTileTokens tokens of one expert, so
// every token runs through its own expert only and a tile's products are small GEMMs (cpu_gemm.h) whose weight
// panels stay in cache across the tile. Work is parallel over fixed chunks of tiles; weight gradients are
// summed per chunk and reduced in chunk order (cpu_common.h), hence deterministic for any thread count.
// Everything is computed in the accumulation type (fp32 for half types, fp64 for fp64) and rounded once on
// output, except n, which follows the reference's rounding. The training pair (_saving / _from_saved) keeps the
// GLU's inputs uv = [u | v] from the forward ([T, 2r], accumulation type): the backward then skips the two
// products that would recompute them, and its results are bitwise those of the recomputing backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "cpu_common.h"
#include "cpu_gemm.h"

namespace pill_kernels_cpu {
namespace {

constexpr const char* kForwardOp = "routed_glu_adapter_forward";
constexpr const char* kBackwardOp = "routed_glu_adapter_backward";
constexpr const char* kForwardSavingOp = "routed_glu_adapter_forward_saving";
constexpr const char* kBackwardFromSavedOp = "routed_glu_adapter_backward_from_saved";

struct Shapes {
  int64_t tokens, hidden, rank, experts;
  int64_t hidden_pad, rank_pad;  // padded to kGemmColAlign: packed weights and tile buffers use these
};

struct Chunk {
  int64_t expert, begin, end;  // positions [begin, end) of the expert-sorted token order
};

struct Routing {
  std::vector<int64_t> order;  // token indices sorted by expert, stable
  std::vector<Chunk> chunks;
  std::vector<bool> used;  // used[e]: expert e has at least one token
};

Shapes check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_gate,
                    const at::Tensor& w_up, const c10::optional<at::Tensor>& expert_ids,
                    const c10::optional<at::Tensor>& norm_weight) {
  check_float_cpu(x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape [T, D], got ", x.sizes());
  check_like(w_down, x, op, "w_down", "x");
  check_like(w_gate, x, op, "w_gate", "x");
  check_like(w_up, x, op, "w_up", "x");
  TORCH_CHECK(w_down.dim() == 3, op, ": w_down must have shape [E, D, r], got ", w_down.sizes());
  Shapes s{};
  s.tokens = x.size(0);
  s.hidden = x.size(1);
  s.experts = w_down.size(0);
  s.rank = w_down.size(2);
  TORCH_CHECK(s.hidden > 0 && s.experts > 0 && s.rank > 0, op, ": D, E and r must be positive, got D=", s.hidden,
              " E=", s.experts, " r=", s.rank);
  check_shape(w_down, {s.experts, s.hidden, s.rank}, op, "w_down", "[E, D, r]");
  check_shape(w_gate, {s.experts, s.hidden, s.rank}, op, "w_gate", "[E, D, r]");
  check_shape(w_up, {s.experts, s.rank, s.hidden}, op, "w_up", "[E, r, D]");
  if (norm_weight.has_value()) {
    check_like(*norm_weight, x, op, "norm_weight", "x");
    check_shape(*norm_weight, {s.hidden}, op, "norm_weight", "[D]");
  }
  if (expert_ids.has_value()) {
    const at::Tensor& ids = *expert_ids;
    TORCH_CHECK(ids.device().is_cpu(), op, ": expert_ids must be a CPU tensor, got ", ids.device());
    TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": expert_ids must be int64, got ", ids.scalar_type());
    TORCH_CHECK(ids.is_contiguous(), op, ": expert_ids must be contiguous");
    check_shape(ids, {s.tokens}, op, "expert_ids", "[T]");
  } else {
    TORCH_CHECK(s.experts == 1, op, ": expert_ids is required when there are E=", s.experts, " experts");
  }
  s.hidden_pad = round_up(s.hidden, kGemmColAlign);
  s.rank_pad = round_up(s.rank, kGemmColAlign);
  return s;
}

Routing route(const char* op, const Shapes& s, const c10::optional<at::Tensor>& expert_ids) {
  Routing routing;
  routing.order.resize(static_cast<size_t>(s.tokens));
  std::vector<int64_t> starts(static_cast<size_t>(s.experts + 1), 0);
  const int64_t* ids = expert_ids.has_value() ? expert_ids->data_ptr<int64_t>() : nullptr;
  for (int64_t t = 0; t < s.tokens; ++t) {
    const int64_t e = ids != nullptr ? ids[t] : 0;
    TORCH_CHECK(e >= 0 && e < s.experts, op, ": expert_ids must lie in [0, ", s.experts, ") for E=", s.experts,
                " experts, got ", e, " at token ", t);
    ++starts[e + 1];
  }
  for (int64_t e = 0; e < s.experts; ++e) starts[e + 1] += starts[e];
  std::vector<int64_t> next(starts.begin(), starts.end() - 1);
  for (int64_t t = 0; t < s.tokens; ++t) routing.order[next[ids != nullptr ? ids[t] : 0]++] = t;
  routing.used.resize(static_cast<size_t>(s.experts));
  for (int64_t e = 0; e < s.experts; ++e) routing.used[e] = starts[e + 1] > starts[e];
  const int64_t per_chunk = chunk_tokens(s.tokens);
  for (int64_t e = 0; e < s.experts; ++e)
    for (int64_t b = starts[e]; b < starts[e + 1]; b += per_chunk)
      routing.chunks.push_back({e, b, std::min(b + per_chunk, starts[e + 1])});
  return routing;
}

// Calls tile(count, rows, tokens, first) for each tile of the chunk: up to kTileTokens tokens of its expert
// (tokens: their indices, in the expert-sorted order), rows = count rounded up to kGemmRowAlign for the GEMMs,
// first: the chunk's first tile (which overwrites the chunk's GEMM-accumulated partials).
template <typename Tile>
void for_each_tile(const Routing& routing, const Chunk& chunk, Tile tile) {
  for (int64_t p = chunk.begin; p < chunk.end; p += kTileTokens) {
    const int64_t count = std::min(kTileTokens, chunk.end - p);
    tile(count, round_up(count, kGemmRowAlign), routing.order.data() + p, p == chunk.begin);
  }
}

// The experts' weights as the tile GEMMs read them, in acc_t with zero padding: W_down and W_gate as [D][rp]
// blocks with leading dimension ld_down_gate (side by side in one [D][2rp] buffer when packed), W_up [rp][Dp] with
// ld_up; for the backward also up_t [E][D][rp] (W_up^T) and
// down_gate_t [E][2rp][Dp] ([W_down | W_gate]^T). When the weights already are acc_t and r and D are multiples
// of kGemmColAlign, the GEMMs read the caller's tensors directly: a decode step (T = 1) then costs no copy of
// the weights.
template <typename scalar_t, typename acc_t>
struct PackedWeights {
  std::unique_ptr<acc_t[]> down_gate, up, up_t, down_gate_t;
  const acc_t* down_base;
  const acc_t* gate_base;
  const acc_t* up_base;
  int64_t expert_stride_down_gate, ld_down_gate, expert_stride_up, ld_up;

  const acc_t* down(int64_t e) const { return down_base + e * expert_stride_down_gate; }
  const acc_t* gate(int64_t e) const { return gate_base + e * expert_stride_down_gate; }
  const acc_t* upw(int64_t e) const { return up_base + e * expert_stride_up; }

  // Only experts that have tokens (used[e]) are packed: a decode step touches one expert.
  PackedWeights(const Shapes& s, const std::vector<bool>& used, const at::Tensor& w_down, const at::Tensor& w_gate,
                const at::Tensor& w_up, bool for_backward) {
    const int64_t D = s.hidden, r = s.rank, rp = s.rank_pad, Dp = s.hidden_pad;
    const scalar_t* wd = w_down.data_ptr<scalar_t>();
    const scalar_t* wg = w_gate.data_ptr<scalar_t>();
    const scalar_t* wu = w_up.data_ptr<scalar_t>();
    const bool direct = std::is_same<scalar_t, acc_t>::value && r == rp && D == Dp;
    if (direct) {
      down_base = reinterpret_cast<const acc_t*>(wd);
      gate_base = reinterpret_cast<const acc_t*>(wg);
      up_base = reinterpret_cast<const acc_t*>(wu);
      expert_stride_down_gate = D * r;
      ld_down_gate = r;
      expert_stride_up = r * D;
      ld_up = D;
    } else {
      expert_stride_down_gate = D * 2 * rp;
      ld_down_gate = 2 * rp;
      expert_stride_up = rp * Dp;
      ld_up = Dp;
      down_gate = scratch<acc_t>(s.experts * expert_stride_down_gate);
      up = scratch<acc_t>(s.experts * expert_stride_up);
      down_base = down_gate.get();
      gate_base = down_gate.get() + rp;
      up_base = up.get();
    }
    if (for_backward) {
      up_t = scratch<acc_t>(s.experts * D * rp);
      down_gate_t = scratch<acc_t>(s.experts * 2 * rp * Dp);
    }
    at::parallel_for(0, s.experts, 1, [&](int64_t e_begin, int64_t e_end) {
      for (int64_t e = e_begin; e < e_end; ++e) {
        if (!used[e]) continue;
        if (!direct) {
          acc_t* dg = down_gate.get() + e * expert_stride_down_gate;
          std::fill(dg, dg + expert_stride_down_gate, acc_t(0));
          pack(wd + e * D * r, D, r, false, dg, 2 * rp);
          pack(wg + e * D * r, D, r, false, dg + rp, 2 * rp);
          acc_t* u = up.get() + e * expert_stride_up;
          std::fill(u, u + expert_stride_up, acc_t(0));
          pack(wu + e * r * D, r, D, false, u, Dp);
        }
        if (for_backward) {
          acc_t* ut = up_t.get() + e * D * rp;
          std::fill(ut, ut + D * rp, acc_t(0));
          pack(wu + e * r * D, r, D, true, ut, rp);
          acc_t* dgt = down_gate_t.get() + e * 2 * rp * Dp;
          std::fill(dgt, dgt + 2 * rp * Dp, acc_t(0));
          pack(wd + e * D * r, D, r, true, dgt, Dp);
          pack(wg + e * D * r, D, r, true, dgt + rp * Dp, Dp);
        }
      }
    });
  }
};

// Loads the tile's rows of x into n (normalised when weight != nullptr; xr and rstd kept for the backward)
// and zero-fills the rows up to rows_pad, which the GEMMs read.
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* x, const int64_t* tokens, int64_t count, int64_t rows_pad, int64_t D, int64_t ld,
               const acc_t* weight, double eps, acc_t* n, acc_t* xr, acc_t* rstd) {
  for (int64_t i = 0; i < count; ++i) {
    const scalar_t* row = x + tokens[i] * D;
    if (weight != nullptr) {
      rstd[i] = rms_norm_row<scalar_t, acc_t>(row, weight, D, eps, n + i * ld, xr != nullptr ? xr + i * ld : nullptr);
    } else {
      for (int64_t k = 0; k < D; ++k) n[i * ld + k] = static_cast<acc_t>(row[k]);
    }
    std::fill(n + i * ld + D, n + (i + 1) * ld, acc_t(0));
  }
  std::fill(n + count * ld, n + rows_pad * ld, acc_t(0));
}

// Tile epilogues shared by the fp32-product and bf16-product kernels. Tile buffers hold rows of Dp (n, out, gy, dn,
// xr) and of 2rp (uv: u in columns [0, r), v in [rp, rp + r)); `tokens` maps a tile row to its token.

template <typename scalar_t, typename acc_t>
void store_y(const acc_t* n, const acc_t* out, const int64_t* tokens, int64_t count, int64_t D, int64_t Dp,
             scalar_t* y) {
  for (int64_t i = 0; i < count; ++i) {
    scalar_t* y_row = y + tokens[i] * D;
    for (int64_t k = 0; k < D; ++k) y_row[k] = static_cast<scalar_t>(n[i * Dp + k] + out[i * Dp + k]);
  }
}

template <typename acc_t>
void save_uv(const acc_t* uv, const int64_t* tokens, int64_t count, int64_t r, int64_t rp, acc_t* saved) {
  for (int64_t i = 0; i < count; ++i) {
    acc_t* row = saved + tokens[i] * 2 * r;
    std::copy(uv + i * 2 * rp, uv + i * 2 * rp + r, row);
    std::copy(uv + i * 2 * rp + rp, uv + i * 2 * rp + rp + r, row + r);
  }
}

template <typename acc_t>
void load_saved_uv(const acc_t* saved, const int64_t* tokens, int64_t count, int64_t rows, int64_t r, int64_t rp,
                   acc_t* uv) {
  std::fill(uv, uv + rows * 2 * rp, acc_t(0));
  for (int64_t i = 0; i < count; ++i) {
    const acc_t* row = saved + tokens[i] * 2 * r;
    std::copy(row, row + r, uv + i * 2 * rp);
    std::copy(row + r, row + 2 * r, uv + i * 2 * rp + rp);
  }
}

// dx = the norm's backward of dn + gy (the skip's gradient), or dn + gy itself without a norm; accumulates the
// norm weight's gradient into d_norm.
template <typename scalar_t, typename acc_t>
void store_dx(acc_t* dn, const acc_t* gy, const acc_t* xr, const acc_t* rstd, const acc_t* weight,
              const int64_t* tokens, int64_t count, int64_t D, int64_t Dp, scalar_t* dx, acc_t* d_norm) {
  for (int64_t i = 0; i < count; ++i) {
    acc_t* dn_row = dn + i * Dp;
    for (int64_t k = 0; k < D; ++k) dn_row[k] += gy[i * Dp + k];
    scalar_t* dx_row = dx + tokens[i] * D;
    if (weight != nullptr) {
      rms_norm_row_backward<scalar_t, acc_t>(dn_row, xr + i * Dp, rstd[i], weight, D, dx_row, d_norm);
    } else {
      for (int64_t k = 0; k < D; ++k) dx_row[k] = static_cast<scalar_t>(dn_row[k]);
    }
  }
}

// Sums the chunks' partial weight gradients (per chunk: d [W_down | W_gate] [Dp][2rp], or [2rp][Dp] when
// down_gate_transposed, d W_up [rp][Dp], d norm weight [D], part_size apart) in chunk order and writes them,
// rounded once, into the gradient tensors.
template <typename scalar_t, typename acc_t>
void write_weight_grads(const Shapes& s, const Routing& routing, const acc_t* partials, int64_t part_size,
                        int64_t part_dg, int64_t part_up, bool has_norm, bool down_gate_transposed,
                        at::Tensor& dw_down, at::Tensor& dw_gate, at::Tensor& dw_up, at::Tensor& dnorm) {
  const int64_t D = s.hidden, r = s.rank, rp = s.rank_pad, Dp = s.hidden_pad;
  const int64_t num_chunks = static_cast<int64_t>(routing.chunks.size());
  // Reduce the chunks' partial sums in chunk order; parallel over rows of the gradients, each row summed as a
  // contiguous vector.
  std::vector<std::vector<int64_t>> chunks_of_expert(static_cast<size_t>(s.experts));
  std::vector<int64_t> all_chunks;
  for (int64_t c = 0; c < num_chunks; ++c) {
    chunks_of_expert[routing.chunks[c].expert].push_back(c);
    all_chunks.push_back(c);
  }
  scalar_t* dwd = dw_down.data_ptr<scalar_t>();
  scalar_t* dwg = dw_gate.data_ptr<scalar_t>();
  scalar_t* dwu = dw_up.data_ptr<scalar_t>();
  // Rows: E * D rows of [d W_down | d W_gate] (E * 2r rows of its transpose), then E * r rows of d W_up, then
  // the norm weight's gradient.
  const int64_t down_gate_rows = down_gate_transposed ? s.experts * 2 * r : s.experts * D, up_rows = s.experts * r;
  at::parallel_for(0, down_gate_rows + up_rows + (has_norm ? 1 : 0), 8, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> sum(static_cast<size_t>(std::max(2 * rp, Dp)));
    for (int64_t row = row_begin; row < row_end; ++row) {
      if (row < down_gate_rows && down_gate_transposed) {
        const int64_t e = row / (2 * r), j = row % (2 * r);
        const bool gate = j >= r;
        const int64_t col = gate ? j - r : j;
        const auto& chunks = chunks_of_expert[e];
        sum_partials(partials + ((gate ? rp : 0) + col) * Dp, part_size, chunks.data(), chunks.size(), D, sum.data());
        scalar_t* out = (gate ? dwg : dwd) + e * D * r + col;
        for (int64_t k = 0; k < D; ++k) out[k * r] = static_cast<scalar_t>(sum[k]);
      } else if (row < down_gate_rows) {
        const int64_t e = row / D, k = row % D;
        const auto& chunks = chunks_of_expert[e];
        sum_partials(partials + k * 2 * rp, part_size, chunks.data(), chunks.size(), 2 * rp, sum.data());
        for (int64_t j = 0; j < r; ++j) {
          dwd[(e * D + k) * r + j] = static_cast<scalar_t>(sum[j]);
          dwg[(e * D + k) * r + j] = static_cast<scalar_t>(sum[rp + j]);
        }
      } else if (row < down_gate_rows + up_rows) {
        const int64_t e = (row - down_gate_rows) / r, j = (row - down_gate_rows) % r;
        const auto& chunks = chunks_of_expert[e];
        sum_partials(partials + part_dg + j * Dp, part_size, chunks.data(), chunks.size(), D, sum.data());
        for (int64_t k = 0; k < D; ++k) dwu[(e * r + j) * D + k] = static_cast<scalar_t>(sum[k]);
      } else {
        sum_partials(partials + part_dg + part_up, part_size, all_chunks.data(), num_chunks, D, sum.data());
        scalar_t* dnw = dnorm.data_ptr<scalar_t>();
        for (int64_t k = 0; k < D; ++k) dnw[k] = static_cast<scalar_t>(sum[k]);
      }
    }
  });
}

template <typename scalar_t>
void forward_kernel(const Shapes& s, const Routing& routing, const at::Tensor& x, const at::Tensor& w_down,
                    const at::Tensor& w_gate, const at::Tensor& w_up, const c10::optional<at::Tensor>& norm_weight,
                    double eps, at::Tensor& y, at::Tensor* uv_saved) {
  using acc_t = at::opmath_type<scalar_t>;
  const GemmFn<acc_t> gemm = select_gemm<acc_t>();
  const int64_t D = s.hidden, rp = s.rank_pad, Dp = s.hidden_pad;
  const PackedWeights<scalar_t, acc_t> packed(s, routing.used, w_down, w_gate, w_up, /*for_backward=*/false);
  std::vector<acc_t> weight;
  if (norm_weight.has_value()) weight = to_acc<scalar_t, acc_t>(*norm_weight);
  const acc_t* weight_ptr = norm_weight.has_value() ? weight.data() : nullptr;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  scalar_t* y_ptr = y.data_ptr<scalar_t>();
  acc_t* saved_ptr = uv_saved != nullptr ? uv_saved->data_ptr<acc_t>() : nullptr;
  const int64_t r = s.rank;

  at::parallel_for(0, static_cast<int64_t>(routing.chunks.size()), 1, [&](int64_t c_begin, int64_t c_end) {
    auto n = scratch<acc_t>(kTileTokens * Dp);
    auto uv = scratch<acc_t>(kTileTokens * 2 * rp);
    auto a = scratch<acc_t>(kTileTokens * rp);
    auto out = scratch<acc_t>(kTileTokens * Dp);
    acc_t rstd[kTileTokens];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const Chunk& chunk = routing.chunks[c];
      const int64_t e = chunk.expert;
      for_each_tile(routing, chunk, [&](int64_t count, int64_t rows, const int64_t* tokens, bool first) {
        load_tile<scalar_t, acc_t>(x_ptr, tokens, count, rows, D, Dp, weight_ptr, eps, n.get(), nullptr, rstd);
        gemm(false, rows, rp, D, n.get(), Dp, 1, packed.down(e), packed.ld_down_gate, uv.get(), 2 * rp);
        gemm(false, rows, rp, D, n.get(), Dp, 1, packed.gate(e), packed.ld_down_gate, uv.get() + rp, 2 * rp);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < rp; ++j) {
            const acc_t down = uv[i * 2 * rp + j], gate = uv[i * 2 * rp + rp + j];
            a[i * rp + j] = gate * sigmoid(gate) * down;
          }
        if (saved_ptr != nullptr) save_uv(uv.get(), tokens, count, r, rp, saved_ptr);
        gemm(false, rows, Dp, rp, a.get(), rp, 1, packed.upw(e), packed.ld_up, out.get(), Dp);
        store_y(n.get(), out.get(), tokens, count, D, Dp, y_ptr);
      });
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Shapes& s, const Routing& routing, const at::Tensor& grad_y, const at::Tensor& x,
                     const at::Tensor& w_down, const at::Tensor& w_gate, const at::Tensor& w_up,
                     const c10::optional<at::Tensor>& norm_weight, double eps, const at::Tensor* uv_saved,
                     at::Tensor& dx, at::Tensor& dw_down, at::Tensor& dw_gate, at::Tensor& dw_up, at::Tensor& dnorm) {
  using acc_t = at::opmath_type<scalar_t>;
  const GemmFn<acc_t> gemm = select_gemm<acc_t>();
  const int64_t D = s.hidden, r = s.rank, rp = s.rank_pad, Dp = s.hidden_pad;
  const PackedWeights<scalar_t, acc_t> packed(s, routing.used, w_down, w_gate, w_up, /*for_backward=*/true);
  const bool has_norm = norm_weight.has_value();
  std::vector<acc_t> weight;
  if (has_norm) weight = to_acc<scalar_t, acc_t>(*norm_weight);
  const acc_t* weight_ptr = has_norm ? weight.data() : nullptr;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* gy_ptr = grad_y.data_ptr<scalar_t>();
  scalar_t* dx_ptr = dx.data_ptr<scalar_t>();
  const acc_t* saved_ptr = uv_saved != nullptr ? uv_saved->data_ptr<acc_t>() : nullptr;

  // Per-chunk partial weight gradients: d down_gate [Dp][2rp], d up [rp][Dp], d norm weight [D].
  const int64_t part_dg = Dp * 2 * rp, part_up = rp * Dp, part_norm = has_norm ? D : 0;
  const int64_t part_size = part_dg + part_up + part_norm;
  const int64_t num_chunks = static_cast<int64_t>(routing.chunks.size());
  auto partials = scratch<acc_t>(num_chunks * part_size);

  at::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    auto n = scratch<acc_t>(kTileTokens * Dp);
    auto xr = scratch<acc_t>(has_norm ? kTileTokens * Dp : 0);
    auto gy = scratch<acc_t>(kTileTokens * Dp);
    auto uv = scratch<acc_t>(kTileTokens * 2 * rp);
    auto da = scratch<acc_t>(kTileTokens * rp);
    auto dudv = scratch<acc_t>(kTileTokens * 2 * rp);
    auto a = scratch<acc_t>(kTileTokens * rp);
    auto dn = scratch<acc_t>(kTileTokens * Dp);
    acc_t rstd[kTileTokens];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const Chunk& chunk = routing.chunks[c];
      const int64_t e = chunk.expert;
      acc_t* d_down_gate = partials.get() + c * part_size;
      acc_t* d_up = d_down_gate + part_dg;
      acc_t* d_norm = d_up + part_up;
      // The chunk's first tile overwrites the GEMM-accumulated partials; only d norm is summed with +=.
      std::fill(d_norm, d_norm + part_norm, acc_t(0));
      const acc_t* up_t = packed.up_t.get() + e * D * rp;
      const acc_t* down_gate_t = packed.down_gate_t.get() + e * 2 * rp * Dp;
      for_each_tile(routing, chunk, [&](int64_t count, int64_t rows, const int64_t* tokens, bool first) {
        load_tile<scalar_t, acc_t>(x_ptr, tokens, count, rows, D, Dp, weight_ptr, eps, n.get(), xr.get(), rstd);
        load_tile<scalar_t, acc_t>(gy_ptr, tokens, count, rows, D, Dp, nullptr, eps, gy.get(), nullptr, nullptr);
        // u = n W_down, v = n W_gate: saved by the forward, or recomputed; da = gy W_up^T.
        if (saved_ptr != nullptr) {
          load_saved_uv(saved_ptr, tokens, count, rows, r, rp, uv.get());
        } else {
          gemm(false, rows, rp, D, n.get(), Dp, 1, packed.down(e), packed.ld_down_gate, uv.get(), 2 * rp);
          gemm(false, rows, rp, D, n.get(), Dp, 1, packed.gate(e), packed.ld_down_gate, uv.get() + rp, 2 * rp);
        }
        gemm(false, rows, rp, D, gy.get(), Dp, 1, up_t, rp, da.get(), rp);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < rp; ++j) {
            const acc_t u = uv[i * 2 * rp + j], v = uv[i * 2 * rp + rp + j], g = da[i * rp + j];
            const acc_t sig = sigmoid(v), silu = v * sig;
            a[i * rp + j] = silu * u;
            dudv[i * 2 * rp + j] = g * silu;
            dudv[i * 2 * rp + rp + j] = g * u * sig * (acc_t(1) + v * (acc_t(1) - sig));
          }
        // d W_up += a^T gy; d [W_down | W_gate] += n^T [du | dv] (K = the tile's tokens).
        const bool accumulate = !first;
        gemm(accumulate, rp, Dp, count, a.get(), 1, rp, gy.get(), Dp, d_up, Dp);
        gemm(accumulate, Dp, 2 * rp, count, n.get(), 1, Dp, dudv.get(), 2 * rp, d_down_gate, 2 * rp);
        // dn = gy (the skip) + du W_down^T + dv W_gate^T.
        gemm(false, rows, Dp, 2 * rp, dudv.get(), 2 * rp, 1, down_gate_t, Dp, dn.get(), Dp);
        store_dx(dn.get(), gy.get(), xr.get(), rstd, weight_ptr, tokens, count, D, Dp, dx_ptr, d_norm);
      });
    }
  });

  write_weight_grads<scalar_t, acc_t>(s, routing, partials.get(), part_size, part_dg, part_up, has_norm,
                                      /*down_gate_transposed=*/false, dw_down, dw_gate, dw_up, dnorm);
}

// ----------------------------------------------------------------------------------------------------------
// bf16 inputs on CPUs with AVX512-BF16: the same tiles, with the products on bf16 operands (select_bf16_gemm).
// n, x and grad_y already are bf16 values; the GLU's output a and its gradients du, dv are rounded to bf16
// before the products that read them, as the bf16 reference rounds every product's inputs. Sums, the norm,
// SiLU and the saved u, v stay fp32.
// ----------------------------------------------------------------------------------------------------------

// The bits of c10::BFloat16(value) (NaN to the quiet NaN 0x7FC0), vectorisable (round_to_bf16).
inline uint16_t bf16_bits(float value) {
  const float rounded = round_to_bf16(value);
  uint32_t bits;
  std::memcpy(&bits, &rounded, sizeof(bits));
  return value != value ? uint16_t(0x7FC0) : static_cast<uint16_t>(bits >> 16);
}

// dst[(k / 2) * 2 * cols + 2 * n + k % 2] = value(k, n) for k < rows (even), n < cols: the pair-interleaved layout
// of cpu_gemm.h's bf16 product.
template <typename Value>
void pack_pairs(int64_t rows, int64_t cols, Value value, uint16_t* dst) {
  for (int64_t k = 0; k < rows; ++k)
    for (int64_t n = 0; n < cols; ++n) dst[(k / 2) * 2 * cols + 2 * n + (k & 1)] = bf16_bits(value(k, n));
}

// The used experts' weights in the pair layout, zero-padded: [W_down | W_gate] (K = Dp, N = 2rp), W_up (K = rp,
// N = Dp), and for the backward W_up^T (K = Dp, N = rp) and [W_down | W_gate]^T (K = 2rp, N = Dp).
struct Bf16Weights {
  std::unique_ptr<uint16_t[]> down_gate, up, up_t, down_gate_t;
  int64_t down_gate_size, up_size;

  Bf16Weights(const Shapes& s, const std::vector<bool>& used, const at::Tensor& w_down, const at::Tensor& w_gate,
              const at::Tensor& w_up, bool for_backward) {
    const int64_t D = s.hidden, r = s.rank, rp = s.rank_pad, Dp = s.hidden_pad;
    const at::BFloat16* wd = w_down.data_ptr<at::BFloat16>();
    const at::BFloat16* wg = w_gate.data_ptr<at::BFloat16>();
    const at::BFloat16* wu = w_up.data_ptr<at::BFloat16>();
    down_gate_size = Dp * 2 * rp;
    up_size = rp * Dp;
    down_gate = scratch<uint16_t>(s.experts * down_gate_size);
    up = scratch<uint16_t>(s.experts * up_size);
    if (for_backward) {
      up_t = scratch<uint16_t>(s.experts * up_size);
      down_gate_t = scratch<uint16_t>(s.experts * down_gate_size);
    }
    at::parallel_for(0, s.experts, 1, [&](int64_t e_begin, int64_t e_end) {
      for (int64_t e = e_begin; e < e_end; ++e) {
        if (!used[e]) continue;
        const at::BFloat16 *d = wd + e * D * r, *g = wg + e * D * r, *u = wu + e * r * D;
        // [W_down | W_gate][k][j]: row k of D, column j < r from W_down, rp <= j < rp + r from W_gate.
        auto down_gate_at = [&](int64_t k, int64_t j) -> float {
          if (k >= D) return 0.f;
          if (j < r) return static_cast<float>(d[k * r + j]);
          if (j >= rp && j < rp + r) return static_cast<float>(g[k * r + j - rp]);
          return 0.f;
        };
        auto up_at = [&](int64_t j, int64_t k) -> float {
          return j < r && k < D ? static_cast<float>(u[j * D + k]) : 0.f;
        };
        pack_pairs(Dp, 2 * rp, down_gate_at, down_gate.get() + e * down_gate_size);
        pack_pairs(rp, Dp, up_at, up.get() + e * up_size);
        if (for_backward) {
          pack_pairs(Dp, rp, [&](int64_t k, int64_t j) { return up_at(j, k); }, up_t.get() + e * up_size);
          pack_pairs(2 * rp, Dp, [&](int64_t j, int64_t k) { return down_gate_at(k, j); },
                     down_gate_t.get() + e * down_gate_size);
        }
      }
    });
  }
};

void to_bf16(const float* src, int64_t size, uint16_t* dst) {
  for (int64_t i = 0; i < size; ++i) dst[i] = bf16_bits(src[i]);
}

void forward_kernel_bf16(Bf16GemmFn bgemm, const Shapes& s, const Routing& routing, const at::Tensor& x,
                         const at::Tensor& w_down, const at::Tensor& w_gate, const at::Tensor& w_up,
                         const c10::optional<at::Tensor>& norm_weight, double eps, at::Tensor& y,
                         at::Tensor* uv_saved) {
  using scalar_t = at::BFloat16;
  const int64_t D = s.hidden, r = s.rank, rp = s.rank_pad, Dp = s.hidden_pad;
  const Bf16Weights packed(s, routing.used, w_down, w_gate, w_up, /*for_backward=*/false);
  std::vector<float> weight;
  if (norm_weight.has_value()) weight = to_acc<scalar_t, float>(*norm_weight);
  const float* weight_ptr = norm_weight.has_value() ? weight.data() : nullptr;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  scalar_t* y_ptr = y.data_ptr<scalar_t>();
  float* saved_ptr = uv_saved != nullptr ? uv_saved->data_ptr<float>() : nullptr;

  at::parallel_for(0, static_cast<int64_t>(routing.chunks.size()), 1, [&](int64_t c_begin, int64_t c_end) {
    auto n = scratch<float>(kTileTokens * Dp);
    auto n16 = scratch<uint16_t>(kTileTokens * Dp);
    auto uv = scratch<float>(kTileTokens * 2 * rp);
    auto a16 = scratch<uint16_t>(kTileTokens * rp);
    auto out = scratch<float>(kTileTokens * Dp);
    float rstd[kTileTokens];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const Chunk& chunk = routing.chunks[c];
      const int64_t e = chunk.expert;
      for_each_tile(routing, chunk, [&](int64_t count, int64_t rows, const int64_t* tokens, bool first) {
        load_tile<scalar_t, float>(x_ptr, tokens, count, rows, D, Dp, weight_ptr, eps, n.get(), nullptr, rstd);
        to_bf16(n.get(), rows * Dp, n16.get());
        bgemm(false, rows, 2 * rp, Dp, n16.get(), Dp, packed.down_gate.get() + e * packed.down_gate_size, 2 * rp,
              uv.get(), 2 * rp);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < rp; ++j) {
            const float down = uv[i * 2 * rp + j], gate = uv[i * 2 * rp + rp + j];
            a16[i * rp + j] = bf16_bits(gate * sigmoid(gate) * down);
          }
        if (saved_ptr != nullptr) save_uv(uv.get(), tokens, count, r, rp, saved_ptr);
        bgemm(false, rows, Dp, rp, a16.get(), rp, packed.up.get() + e * packed.up_size, Dp, out.get(), Dp);
        store_y(n.get(), out.get(), tokens, count, D, Dp, y_ptr);
      });
    }
  });
}

void backward_kernel_bf16(Bf16GemmFn bgemm, const Shapes& s, const Routing& routing, const at::Tensor& grad_y,
                          const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_gate,
                          const at::Tensor& w_up, const c10::optional<at::Tensor>& norm_weight, double eps,
                          const at::Tensor* uv_saved, at::Tensor& dx, at::Tensor& dw_down, at::Tensor& dw_gate,
                          at::Tensor& dw_up, at::Tensor& dnorm) {
  using scalar_t = at::BFloat16;
  const int64_t D = s.hidden, r = s.rank, rp = s.rank_pad, Dp = s.hidden_pad;
  const Bf16Weights packed(s, routing.used, w_down, w_gate, w_up, /*for_backward=*/true);
  const bool has_norm = norm_weight.has_value();
  std::vector<float> weight;
  if (has_norm) weight = to_acc<scalar_t, float>(*norm_weight);
  const float* weight_ptr = has_norm ? weight.data() : nullptr;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* gy_ptr = grad_y.data_ptr<scalar_t>();
  scalar_t* dx_ptr = dx.data_ptr<scalar_t>();
  const float* saved_ptr = uv_saved != nullptr ? uv_saved->data_ptr<float>() : nullptr;

  // Per-chunk partials as in backward_kernel, but d [W_down | W_gate] transposed, [2rp][Dp]: it is computed as
  // [du | dv]^T n, whose B operand (n over the tile's tokens) packs with contiguous writes.
  const int64_t part_dg = 2 * rp * Dp, part_up = rp * Dp, part_norm = has_norm ? D : 0;
  const int64_t part_size = part_dg + part_up + part_norm;
  const int64_t num_chunks = static_cast<int64_t>(routing.chunks.size());
  auto partials = scratch<float>(num_chunks * part_size);

  at::parallel_for(0, num_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    // Operands of the products, bf16: row-major where they are A, in pairs over the tile's tokens where they are
    // the B of a weight gradient (K = tokens).
    auto n = scratch<float>(kTileTokens * Dp);
    auto n16 = scratch<uint16_t>(kTileTokens * Dp);       // A of [u | v] = n [W_down | W_gate] (recomputed)
    auto n_pairs = scratch<uint16_t>(kTileTokens * Dp);   // B of d [W_down | W_gate]^T = [du | dv]^T n
    auto xr = scratch<float>(has_norm ? kTileTokens * Dp : 0);
    auto gy = scratch<float>(kTileTokens * Dp);
    auto gy16 = scratch<uint16_t>(kTileTokens * Dp);      // A of da = grad_y W_up^T
    auto gy_pairs = scratch<uint16_t>(kTileTokens * Dp);  // B of d W_up = a^T grad_y
    auto uv = scratch<float>(kTileTokens * 2 * rp);
    auto da = scratch<float>(kTileTokens * rp);
    auto a_t16 = scratch<uint16_t>(rp * kTileTokens);          // A of d W_up
    auto dudv_t16 = scratch<uint16_t>(2 * rp * kTileTokens);   // A of d [W_down | W_gate]^T
    auto dudv16 = scratch<uint16_t>(kTileTokens * 2 * rp);     // A of dn = [du | dv] [W_down | W_gate]^T
    auto dn = scratch<float>(kTileTokens * Dp);
    float rstd[kTileTokens];
    for (int64_t c = c_begin; c < c_end; ++c) {
      const Chunk& chunk = routing.chunks[c];
      const int64_t e = chunk.expert;
      float* d_down_gate_t = partials.get() + c * part_size;
      float* d_up = d_down_gate_t + part_dg;
      float* d_norm = d_up + part_up;
      std::fill(d_norm, d_norm + part_norm, 0.f);
      for_each_tile(routing, chunk, [&](int64_t count, int64_t rows, const int64_t* tokens, bool first) {
        load_tile<scalar_t, float>(x_ptr, tokens, count, rows, D, Dp, weight_ptr, eps, n.get(), xr.get(), rstd);
        load_tile<scalar_t, float>(gy_ptr, tokens, count, rows, D, Dp, nullptr, eps, gy.get(), nullptr, nullptr);
        for (int64_t i = 0; i < rows; i += 2) {  // rows is even (a multiple of kGemmRowAlign)
          uint16_t* n_pair = n_pairs.get() + i * Dp;
          uint16_t* gy_pair = gy_pairs.get() + i * Dp;
          for (int64_t k = 0; k < Dp; ++k) {
            n_pair[2 * k] = bf16_bits(n[i * Dp + k]);
            n_pair[2 * k + 1] = bf16_bits(n[(i + 1) * Dp + k]);
            gy_pair[2 * k] = bf16_bits(gy[i * Dp + k]);
            gy_pair[2 * k + 1] = bf16_bits(gy[(i + 1) * Dp + k]);
          }
        }
        to_bf16(gy.get(), rows * Dp, gy16.get());
        if (saved_ptr != nullptr) {
          load_saved_uv(saved_ptr, tokens, count, rows, r, rp, uv.get());
        } else {
          to_bf16(n.get(), rows * Dp, n16.get());
          bgemm(false, rows, 2 * rp, Dp, n16.get(), Dp, packed.down_gate.get() + e * packed.down_gate_size, 2 * rp,
                uv.get(), 2 * rp);
        }
        bgemm(false, rows, rp, Dp, gy16.get(), Dp, packed.up_t.get() + e * packed.up_size, rp, da.get(), rp);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < rp; ++j) {
            const float u = uv[i * 2 * rp + j], v = uv[i * 2 * rp + rp + j], g = da[i * rp + j];
            const float sig = sigmoid(v), silu = v * sig;
            a_t16[j * rows + i] = bf16_bits(silu * u);
            const uint16_t du = bf16_bits(g * silu), dv = bf16_bits(g * u * sig * (1.f + v * (1.f - sig)));
            dudv16[i * 2 * rp + j] = du;
            dudv16[i * 2 * rp + rp + j] = dv;
            dudv_t16[j * rows + i] = du;
            dudv_t16[(rp + j) * rows + i] = dv;
          }
        const bool accumulate = !first;
        bgemm(accumulate, rp, Dp, rows, a_t16.get(), rows, gy_pairs.get(), Dp, d_up, Dp);
        bgemm(accumulate, 2 * rp, Dp, rows, dudv_t16.get(), rows, n_pairs.get(), Dp, d_down_gate_t, Dp);
        bgemm(false, rows, Dp, 2 * rp, dudv16.get(), 2 * rp, packed.down_gate_t.get() + e * packed.down_gate_size,
              Dp, dn.get(), Dp);
        store_dx(dn.get(), gy.get(), xr.get(), rstd, weight_ptr, tokens, count, D, Dp, dx_ptr, d_norm);
      });
    }
  });
  write_weight_grads<scalar_t, float>(s, routing, partials.get(), part_size, part_dg, part_up, has_norm,
                                      /*down_gate_transposed=*/true, dw_down, dw_gate, dw_up, dnorm);
}

at::Tensor forward_impl(const char* op, const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_gate,
                        const at::Tensor& w_up, const c10::optional<at::Tensor>& expert_ids,
                        const c10::optional<at::Tensor>& norm_weight, double eps, at::Tensor* uv_saved) {
  const Shapes s = check_inputs(op, x, w_down, w_gate, w_up, expert_ids, norm_weight);
  const Routing routing = route(op, s, expert_ids);
  at::Tensor y = at::empty_like(x);
  if (uv_saved != nullptr)
    *uv_saved = at::empty({s.tokens, 2 * s.rank}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  const Bf16GemmFn bgemm = x.scalar_type() == at::kBFloat16 ? select_bf16_gemm() : nullptr;
  if (bgemm != nullptr) {
    forward_kernel_bf16(bgemm, s, routing, x, w_down, w_gate, w_up, norm_weight, eps, y, uv_saved);
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "routed_glu_adapter", [&] {
    forward_kernel<scalar_t>(s, routing, x, w_down, w_gate, w_up, norm_weight, eps, y, uv_saved);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const char* op, const at::Tensor& grad_y, const at::Tensor* uv_saved, const at::Tensor& x,
    const at::Tensor& w_down, const at::Tensor& w_gate, const at::Tensor& w_up,
    const c10::optional<at::Tensor>& expert_ids, const c10::optional<at::Tensor>& norm_weight, double eps) {
  const Shapes s = check_inputs(op, x, w_down, w_gate, w_up, expert_ids, norm_weight);
  check_like(grad_y, x, op, "grad_y", "x");
  check_shape(grad_y, x.sizes(), op, "grad_y", "x.shape");
  if (uv_saved != nullptr) {
    TORCH_CHECK(uv_saved->device().is_cpu() && uv_saved->is_contiguous(), op,
                ": uv must be a contiguous CPU tensor (routed_glu_adapter_forward_saving's second output)");
    TORCH_CHECK(uv_saved->scalar_type() == at::toOpMathType(x.scalar_type()), op, ": uv must have dtype ",
                at::toOpMathType(x.scalar_type()), " for x of dtype ", x.scalar_type(), ", got ",
                uv_saved->scalar_type());
    check_shape(*uv_saved, {s.tokens, 2 * s.rank}, op, "uv", "[T, 2r]");
  }
  const Routing routing = route(op, s, expert_ids);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw_down = at::empty_like(w_down), dw_gate = at::empty_like(w_gate), dw_up = at::empty_like(w_up);
  at::Tensor dnorm = norm_weight.has_value() ? at::empty_like(*norm_weight) : x.new_empty({0});
  const Bf16GemmFn bgemm = x.scalar_type() == at::kBFloat16 ? select_bf16_gemm() : nullptr;
  if (bgemm != nullptr) {
    backward_kernel_bf16(bgemm, s, routing, grad_y, x, w_down, w_gate, w_up, norm_weight, eps, uv_saved, dx, dw_down,
                         dw_gate, dw_up, dnorm);
    return {dx, dw_down, dw_gate, dw_up, dnorm};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "routed_glu_adapter", [&] {
    backward_kernel<scalar_t>(s, routing, grad_y, x, w_down, w_gate, w_up, norm_weight, eps, uv_saved, dx, dw_down,
                              dw_gate, dw_up, dnorm);
  });
  return {dx, dw_down, dw_gate, dw_up, dnorm};
}

at::Tensor routed_glu_adapter_forward_cpu(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_gate,
                                          const at::Tensor& w_up, const c10::optional<at::Tensor>& expert_ids,
                                          const c10::optional<at::Tensor>& norm_weight, double eps) {
  return forward_impl(kForwardOp, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps, nullptr);
}

std::tuple<at::Tensor, at::Tensor> routed_glu_adapter_forward_saving_cpu(
    const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_gate, const at::Tensor& w_up,
    const c10::optional<at::Tensor>& expert_ids, const c10::optional<at::Tensor>& norm_weight, double eps) {
  at::Tensor uv;
  at::Tensor y = forward_impl(kForwardSavingOp, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps, &uv);
  return {y, uv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_glu_adapter_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_gate,
    const at::Tensor& w_up, const c10::optional<at::Tensor>& expert_ids, const c10::optional<at::Tensor>& norm_weight,
    double eps) {
  return backward_impl(kBackwardOp, grad_y, nullptr, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_glu_adapter_backward_from_saved_cpu(
    const at::Tensor& grad_y, const at::Tensor& uv, const at::Tensor& x, const at::Tensor& w_down,
    const at::Tensor& w_gate, const at::Tensor& w_up, const c10::optional<at::Tensor>& expert_ids,
    const c10::optional<at::Tensor>& norm_weight, double eps) {
  return backward_impl(kBackwardFromSavedOp, grad_y, &uv, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps);
}

}  // namespace
}  // namespace pill_kernels_cpu

TORCH_LIBRARY_IMPL(pill_kernels_C, CPU, m) {
  m.impl("routed_glu_adapter_forward", &pill_kernels_cpu::routed_glu_adapter_forward_cpu);
  m.impl("routed_glu_adapter_backward", &pill_kernels_cpu::routed_glu_adapter_backward_cpu);
  m.impl("routed_glu_adapter_forward_saving", &pill_kernels_cpu::routed_glu_adapter_forward_saving_cpu);
  m.impl("routed_glu_adapter_backward_from_saved", &pill_kernels_cpu::routed_glu_adapter_backward_from_saved_cpu);
}
