// CUDA-core kernels of the hard-routed GLU adapter (routed_glu_adapter.cu chooses between them and the
// tensor-core kernels of routed_glu_adapter_tensor_core.cu):
//
//   n = RMSNorm(x; g, eps) or x;   y[t] = n[t] + W_up[e](SiLU(n[t] W_gate[e]) * (n[t] W_down[e])),  e = ids[t]
//
// Design (fp32 accumulation; the tensor-core kernels have their own notes):
// - One warp per token. Each token reads only its own expert's weights, so tiles of mixed modality need no
//   sorting, padding or host sync (the routing is a pointer offset per warp). Lanes stride over D, 16-byte
//   vectors where alignment allows; the three weight matrices (3 * D * r elements per expert: 768 KiB in bf16 at
//   D = 4096, r = 32) stay resident in L2 and the eight warps of a block share them through L1.
// - The fused RMSNorm uses n W = rstd * ((x * g) W): the sum of squares and the projections accumulate in the
//   same pass over x, rstd is applied to the r-vectors afterwards. The skip term n is rounded as the reference
//   rounds it (normalise in fp32, cast, scale) so half-precision outputs follow transformers' LlamaRMSNorm.
// - Forward: 2 passes over the row (projections; then y = n + a W_up), the second from L1/L2.
//   Backward, kernel 1 (per token): projections and dy W_up^T in one pass, the GLU derivative on r-vectors,
//   then dn = dy + dh_down W_down^T + dh_gate W_gate^T and, with the norm, dx = rstd (dn g - xhat mean(dn g xhat))
//   (one pass for the mean, one to write dx). The per-token r-vectors and rstd go to a small fp32 workspace.
//   Kernel 2 (weight gradients) reads x, dy and those vectors per (D chunk, token split, expert) and writes
//   per-split partials; kernel 3 sums the splits in a fixed order (deterministic, no float atomics). Kernel 3
//   also sums the tensor-core weight-gradient kernel's partials, which share the slab layout.
//   The norm-weight gradient needs no extra pass over tokens:
//     dg[d] = sum_t dn[t,d] xhat[t,d] = sum_t dy xhat + sum_j W_down[e][d,j] S_down[d,j] + W_gate[e][d,j] S_gate[d,j]
//   with S[d,j] = sum_t xhat[t,d] dh[t,j], the same sums that give dW = g[d] S[d,j].
//
// Floor (H100, D = 4096, r = 32, bf16): 6 D r flops per token forward against 4 D bytes moved (x in, y out),
// 48 flop/byte, above the ~20 flop/byte the fp32 CUDA cores sustain per byte of HBM bandwidth. These CUDA-core
// kernels are therefore arithmetic-bound at roughly 2-3x the byte floor; they serve fp32 and the shapes the
// tensor-core kernels do not take (r not 16 or 32, D not a multiple of 64, unaligned rows). Backward
// moves x and dy twice (kernel 1 and kernel 2) and writes dx: 5 T D elements against a floor of 3 T D.
#include "routed_glu_adapter.cuh"

namespace pill_cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * kWarp;
constexpr int kColGroups = kThreads / kChunk;  // thread groups over r in the weight-gradient tiles

template <typename T, int RMAX, int VEC>
__global__ void __launch_bounds__(kThreads)
routed_glu_forward_kernel(const T* __restrict__ x, const T* __restrict__ w_down, const T* __restrict__ w_gate,
                          const T* __restrict__ w_up, const int64_t* __restrict__ expert_ids,
                          const T* __restrict__ norm_weight, T* __restrict__ y, long long tokens, int D, int r,
                          int E, float eps, bool row_vec) {
  const int lane = threadIdx.x % kWarp;
  const long long t = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (t >= tokens) return;  // whole warp
  const T* xr = x + t * D;
  T* yr = y + t * D;
  const long long e = expert_ids != nullptr ? expert_ids[t] : 0;
  if (e < 0 || e >= E) {
    // The Python layer range-checks ids; should one slip through (PILL_KERNELS_CHECKS=0), make it visible
    // instead of reading out of bounds.
    for (int d = lane; d < D; d += kWarp) yr[d] = from_float<T>(__int_as_float(0x7fc00000));
    return;
  }
  const size_t wsize = static_cast<size_t>(D) * r;
  const T* wd = w_down + e * wsize;
  const T* wg = w_gate + e * wsize;
  const T* wu = w_up + e * wsize;
  const bool norm = norm_weight != nullptr;

  float hd[RMAX], hg[RMAX];
#pragma unroll
  for (int j = 0; j < RMAX; ++j) hd[j] = hg[j] = 0.f;
  float ss = 0.f;
  for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
    float xv[VEC], gv[VEC];
    load_vec<T, VEC>(xr + d0, xv);
    if (norm) load_vec<T, VEC>(norm_weight + d0, gv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      ss += xv[v] * xv[v];
      const float xg = norm ? xv[v] * gv[v] : xv[v];
      fma_row<T, RMAX>(hd, wd + static_cast<size_t>(d0 + v) * r, r, xg, row_vec);
      fma_row<T, RMAX>(hg, wg + static_cast<size_t>(d0 + v) * r, r, xg, row_vec);
    }
  }
  ss = warp_sum(ss);
  warp_sum(hd, r);
  warp_sum(hg, r);
  const float rstd = norm ? rsqrtf(ss / static_cast<float>(D) + eps) : 1.f;
  // a = SiLU(n W_gate) * (n W_down), kept in hd.
#pragma unroll
  for (int j = 0; j < RMAX; ++j) {
    const float zg = rstd * hg[j];
    hd[j] = zg * sigmoidf_acc(zg) * (rstd * hd[j]);
  }

  for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
    float xv[VEC], gv[VEC], out[VEC];
    load_vec<T, VEC>(xr + d0, xv);
    if (norm) load_vec<T, VEC>(norm_weight + d0, gv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = norm ? round_to<T>(round_to<T>(xv[v] * rstd) * gv[v]) : xv[v];
#pragma unroll
    for (int j = 0; j < RMAX; ++j) {
      if (j < r) {
        float w[VEC];
        load_vec<T, VEC>(wu + static_cast<size_t>(j) * D + d0, w);
#pragma unroll
        for (int v = 0; v < VEC; ++v) out[v] += hd[j] * w[v];
      }
    }
    store_vec<T, VEC>(yr + d0, out);
  }
}

// Per-token backward: dx and the per-token vectors [a (r), dh_down (r), dh_gate (r), rstd] in tok_ws.
template <typename T, int RMAX, int VEC>
__global__ void __launch_bounds__(kThreads)
routed_glu_backward_token_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w_down,
                                 const T* __restrict__ w_gate, const T* __restrict__ w_up,
                                 const int64_t* __restrict__ expert_ids, const T* __restrict__ norm_weight,
                                 T* __restrict__ dx, float* __restrict__ tok_ws, long long tokens, int D, int r,
                                 int E, float eps, bool row_vec) {
  const int lane = threadIdx.x % kWarp;
  const long long t = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (t >= tokens) return;
  const T* xr = x + t * D;
  const T* dyr = dy + t * D;
  T* dxr = dx + t * D;
  float* ws = tok_ws + t * (3LL * r + 1);
  const long long e = expert_ids != nullptr ? expert_ids[t] : 0;
  if (e < 0 || e >= E) {
    // Out-of-range id (see the forward): NaN gradient; the weight-gradient pass matches no expert to it.
    for (int d = lane; d < D; d += kWarp) dxr[d] = from_float<T>(__int_as_float(0x7fc00000));
    return;
  }
  const size_t wsize = static_cast<size_t>(D) * r;
  const T* wd = w_down + e * wsize;
  const T* wg = w_gate + e * wsize;
  const T* wu = w_up + e * wsize;
  const bool norm = norm_weight != nullptr;

  float hd[RMAX], hg[RMAX], ga[RMAX];
#pragma unroll
  for (int j = 0; j < RMAX; ++j) hd[j] = hg[j] = ga[j] = 0.f;
  float ss = 0.f;
  for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
    float xv[VEC], gv[VEC], dv[VEC];
    load_vec<T, VEC>(xr + d0, xv);
    load_vec<T, VEC>(dyr + d0, dv);
    if (norm) load_vec<T, VEC>(norm_weight + d0, gv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      ss += xv[v] * xv[v];
      const float xg = norm ? xv[v] * gv[v] : xv[v];
      fma_row<T, RMAX>(hd, wd + static_cast<size_t>(d0 + v) * r, r, xg, row_vec);
      fma_row<T, RMAX>(hg, wg + static_cast<size_t>(d0 + v) * r, r, xg, row_vec);
    }
#pragma unroll
    for (int j = 0; j < RMAX; ++j) {
      if (j < r) {
        float w[VEC];
        load_vec<T, VEC>(wu + static_cast<size_t>(j) * D + d0, w);
#pragma unroll
        for (int v = 0; v < VEC; ++v) ga[j] += dv[v] * w[v];
      }
    }
  }
  ss = warp_sum(ss);
  warp_sum(hd, r);
  warp_sum(hg, r);
  warp_sum(ga, r);
  const float rstd = norm ? rsqrtf(ss / static_cast<float>(D) + eps) : 1.f;
  // In place: hd <- a, ga <- dh_down, hg <- dh_gate.
#pragma unroll
  for (int j = 0; j < RMAX; ++j) {
    const float zd = rstd * hd[j], zg = rstd * hg[j];
    const float sig = sigmoidf_acc(zg);
    const float s = zg * sig;
    const float da = ga[j];
    hd[j] = s * zd;
    ga[j] = da * s;
    hg[j] = da * zd * sig * (1.f + zg * (1.f - sig));
  }
  store_lane_spread<RMAX>(ws, hd, r, lane);
  store_lane_spread<RMAX>(ws + r, ga, r, lane);
  store_lane_spread<RMAX>(ws + 2 * r, hg, r, lane);
  if (lane == 0) ws[3 * r] = rstd;

  // With the norm, dx needs mean(dn g xhat) over the row first; dn is recomputed rather than kept (a row of
  // fp32 dn per warp would not fit in shared memory at LLaMA widths).
  float c = 0.f;
  if (norm) {
    for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
      float xv[VEC], gv[VEC], dv[VEC];
      load_vec<T, VEC>(xr + d0, xv);
      load_vec<T, VEC>(dyr + d0, dv);
      load_vec<T, VEC>(norm_weight + d0, gv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const size_t row = static_cast<size_t>(d0 + v) * r;
        const float dn = dv[v] + dot_row<T, RMAX>(wd + row, ga, r, row_vec) + dot_row<T, RMAX>(wg + row, hg, r, row_vec);
        c += dn * gv[v] * xv[v] * rstd;
      }
    }
    c = warp_sum(c) / static_cast<float>(D);
  }
  for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
    float xv[VEC], gv[VEC], dv[VEC], out[VEC];
    load_vec<T, VEC>(xr + d0, xv);
    load_vec<T, VEC>(dyr + d0, dv);
    if (norm) load_vec<T, VEC>(norm_weight + d0, gv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const size_t row = static_cast<size_t>(d0 + v) * r;
      const float dn = dv[v] + dot_row<T, RMAX>(wd + row, ga, r, row_vec) + dot_row<T, RMAX>(wg + row, hg, r, row_vec);
      out[v] = norm ? rstd * (dn * gv[v] - xv[v] * rstd * c) : dn;
    }
    store_vec<T, VEC>(dxr + d0, out);
  }
}

// Block (D chunk, token split, expert): sums over the split's tokens of that expert. Every block writes its
// whole tile (zeros when it has no tokens), so the reduction never reads unwritten workspace.
template <typename T, int RMAX>
__global__ void __launch_bounds__(kThreads)
routed_glu_weight_grad_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                              const int64_t* __restrict__ expert_ids, const float* __restrict__ tok_ws,
                              float* __restrict__ partials, long long tokens, int D, int r, int E, int splits,
                              bool norm) {
  constexpr int NI = RMAX / kColGroups;
  const int dl = threadIdx.x % kChunk, jg = threadIdx.x / kChunk;
  const int d = blockIdx.x * kChunk + dl;
  const int s = blockIdx.y, e = blockIdx.z;
  float up[NI], sd[NI], sg[NI], q = 0.f;
#pragma unroll
  for (int i = 0; i < NI; ++i) up[i] = sd[i] = sg[i] = 0.f;
  long long begin, end;
  split_range(tokens, s, splits, begin, end);
  const long long stride = 3LL * r + 1;
  if (d < D) {
    for (long long t = begin; t < end; ++t) {
      const long long et = expert_ids != nullptr ? expert_ids[t] : 0;
      if (et != e) continue;
      const float* w = tok_ws + t * stride;
      const float xv = to_float<T>(x[t * D + d]);
      const float dv = to_float<T>(dy[t * D + d]);
      const float xh = norm ? xv * w[3 * r] : xv;
      q += dv * xh;
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int j = jg + kColGroups * i;
        if (j < r) {
          up[i] += w[j] * dv;
          sd[i] += xh * w[r + j];
          sg[i] += xh * w[2 * r + j];
        }
      }
    }
    float* slab = partials + (static_cast<size_t>(s) * E + e) * slab_floats(D, r);
    const size_t rd = static_cast<size_t>(r) * D;
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      const int j = jg + kColGroups * i;
      if (j < r) {
        slab[static_cast<size_t>(j) * D + d] = up[i];
        slab[rd + static_cast<size_t>(d) * r + j] = sd[i];
        slab[2 * rd + static_cast<size_t>(d) * r + j] = sg[i];
      }
    }
    if (jg == 0) slab[3 * rd + d] = q;
  }
}

// Sums the split partials in split order and casts: dW_up, dW_down = g S_down, dW_gate = g S_gate, and dg.
template <typename T>
__global__ void __launch_bounds__(256)
routed_glu_reduce_kernel(const float* __restrict__ partials, const T* __restrict__ w_down,
                         const T* __restrict__ w_gate, const T* __restrict__ norm_weight, T* __restrict__ dw_down,
                         T* __restrict__ dw_gate, T* __restrict__ dw_up, T* __restrict__ dnorm, int D, int r, int E,
                         int splits) {
  const size_t rd = static_cast<size_t>(r) * D;
  const size_t slab = slab_floats(D, r);
  const size_t per_matrix = static_cast<size_t>(E) * rd;
  const size_t total = 3 * per_matrix + (norm_weight != nullptr ? D : 0);
  for (size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    if (idx < 3 * per_matrix) {
      const int m = static_cast<int>(idx / per_matrix);  // 0: up, 1: down, 2: gate
      const size_t k = idx - m * per_matrix;
      const size_t e = k / rd, rem = k % rd;
      const size_t offset = (m == 0 ? 0 : (m == 1 ? rd : 2 * rd)) + rem;
      float acc = 0.f;
      for (int s = 0; s < splits; ++s) acc += partials[(static_cast<size_t>(s) * E + e) * slab + offset];
      if (m == 0) {
        dw_up[k] = from_float<T>(acc);
      } else {
        if (norm_weight != nullptr) acc *= to_float<T>(norm_weight[rem / r]);
        (m == 1 ? dw_down : dw_gate)[k] = from_float<T>(acc);
      }
    } else {
      const int d = static_cast<int>(idx - 3 * per_matrix);
      float acc = 0.f;
      for (int e = 0; e < E; ++e) {
        for (int s = 0; s < splits; ++s) acc += partials[(static_cast<size_t>(s) * E + e) * slab + 3 * rd + d];
        for (int j = 0; j < r; ++j) {
          float sdown = 0.f, sgate = 0.f;
          for (int s = 0; s < splits; ++s) {
            const float* p = partials + (static_cast<size_t>(s) * E + e) * slab + static_cast<size_t>(d) * r + j;
            sdown += p[rd];
            sgate += p[2 * rd];
          }
          const size_t w = static_cast<size_t>(e) * rd + static_cast<size_t>(d) * r + j;
          acc += to_float<T>(w_down[w]) * sdown + to_float<T>(w_gate[w]) * sgate;
        }
      }
      dnorm[d] = from_float<T>(acc);
    }
  }
}

}  // namespace

cudaError_t launch_routed_glu_forward(Dtype dtype, const void* x, const void* w_down, const void* w_gate,
                                      const void* w_up, const int64_t* expert_ids, const void* norm_weight, void* y,
                                      long long tokens, int hidden, int rank, int experts, float eps,
                                      cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec16<T>();
    const bool vec = rows_vectorizable(hidden, V, {x, y, w_up, norm_weight});
    const bool row_vec = rank % V == 0 && aligned16(w_down) && aligned16(w_gate);
    return with_rank(rank, [&](auto rmax) {
      constexpr int RMAX = decltype(rmax)::value;
      const dim3 grid(blocks_for(tokens, kWarpsPerBlock));
      auto args = [&](auto kernel) {
        PILL_LAUNCH(grid, kThreads, 0, stream, kernel)(
            static_cast<const T*>(x), static_cast<const T*>(w_down), static_cast<const T*>(w_gate),
            static_cast<const T*>(w_up), expert_ids, static_cast<const T*>(norm_weight), static_cast<T*>(y), tokens,
            hidden, rank, experts, eps, row_vec);
        return cudaGetLastError();
      };
      return vec ? args(routed_glu_forward_kernel<T, RMAX, V>) : args(routed_glu_forward_kernel<T, RMAX, 1>);
    });
  });
}

cudaError_t launch_routed_glu_backward_token(Dtype dtype, const void* grad_y, const void* x, const void* w_down,
                                             const void* w_gate, const void* w_up, const int64_t* expert_ids,
                                             const void* norm_weight, void* grad_x, float* tok_ws, long long tokens,
                                             int hidden, int rank, int experts, float eps, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec16<T>();
    const bool vec = rows_vectorizable(hidden, V, {x, grad_y, grad_x, w_up, norm_weight});
    const bool row_vec = rank % V == 0 && aligned16(w_down) && aligned16(w_gate);
    return with_rank(rank, [&](auto rmax) {
      constexpr int RMAX = decltype(rmax)::value;
      const dim3 grid(blocks_for(tokens, kWarpsPerBlock));
      auto launch = [&](auto kernel) {
        PILL_LAUNCH(grid, kThreads, 0, stream, kernel)(
            static_cast<const T*>(grad_y), static_cast<const T*>(x), static_cast<const T*>(w_down),
            static_cast<const T*>(w_gate), static_cast<const T*>(w_up), expert_ids,
            static_cast<const T*>(norm_weight), static_cast<T*>(grad_x), tok_ws, tokens, hidden, rank, experts,
            eps, row_vec);
        return cudaGetLastError();
      };
      return vec ? launch(routed_glu_backward_token_kernel<T, RMAX, V>)
                 : launch(routed_glu_backward_token_kernel<T, RMAX, 1>);
    });
  });
}

cudaError_t launch_routed_glu_weight_grad(Dtype dtype, const void* grad_y, const void* x,
                                          const int64_t* expert_ids, const float* tok_ws, float* partials,
                                          long long tokens, int hidden, int rank, int experts, int splits, bool norm,
                                          cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_rank(rank, [&](auto rmax) {
      constexpr int RMAX = decltype(rmax)::value;
      const dim3 wgrid(blocks_for(hidden, kChunk), splits, experts);
      PILL_LAUNCH(wgrid, kThreads, 0, stream, routed_glu_weight_grad_kernel<T, RMAX>)(
          static_cast<const T*>(grad_y), static_cast<const T*>(x), expert_ids, tok_ws, partials, tokens, hidden,
          rank, experts, splits, norm);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_routed_glu_reduce(Dtype dtype, const float* partials, const void* w_down, const void* w_gate,
                                     const void* norm_weight, void* grad_w_down, void* grad_w_gate, void* grad_w_up,
                                     void* grad_norm_weight, int hidden, int rank, int experts, int splits,
                                     cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t outputs = 3 * static_cast<size_t>(experts) * rank * hidden + (norm_weight ? hidden : 0);
    const unsigned rblocks = static_cast<unsigned>(outputs / 256 + 1 < 4096 ? outputs / 256 + 1 : 4096);
    PILL_LAUNCH(rblocks, 256, 0, stream, routed_glu_reduce_kernel<T>)(
        partials, static_cast<const T*>(w_down), static_cast<const T*>(w_gate), static_cast<const T*>(norm_weight),
        static_cast<T*>(grad_w_down), static_cast<T*>(grad_w_gate), static_cast<T*>(grad_w_up),
        static_cast<T*>(grad_norm_weight), hidden, rank, experts, splits);
    return cudaGetLastError();
  });
}

}  // namespace pill_cuda
