// LaVIN's soft-routed RepAdapter (shared down-projection, E soft-mixed up-projections), optional fused RMSNorm.
//
//   n = RMSNorm(x; g, eps) or x;   z = (n W_down + b_down) * mask;   y = n + scale * sum_e w[t,e] (z W_up[e] + b_up[e])
//
// Design: the layout of routed_glu_adapter_cuda_core.cu (one warp per token, lanes over D, 16-byte vectors where
// aligned, fp32 accumulation, the fused norm as n W = rstd * ((x g) W)). The E experts are a runtime loop inside the
// token's warp (LaVIN has E = 2), so register use does not grow with E.
// Backward, kernel 1 (per token): z from one pass over x; per expert e one pass over dy gives
// u_e = dy W_up[e]^T and v_e = dy . b_up[e], hence d routing_weights[t,e] = scale (z . u_e + v_e) and
// dz = scale sum_e w[t,e] u_e; then dn = dy + (dz * mask) W_down^T and dx through the norm. The rows are re-read
// from L1/L2 (E + 3 passes over a row that was fetched from HBM once).
// Kernel 2 (weight gradients) per (D chunk, token split, expert or the shared down-projection) writes per-split
// partials; kernel 3 sums them in a fixed order (deterministic, no float atomics). As in the routed adapter,
// dg[d] = sum_t dy xhat + sum_j W_down[d,j] S[d,j] with S[d,j] = sum_t xhat[t,d] dzpre[t,j], and dW_down = g S.
// Floor: like the routed adapter (x and dy in, y / dx out); with r = 8 the arithmetic is light and the kernels
// sit close to bandwidth-bound on the row passes.
#include "cuda_utils.cuh"
#include "soft_routed_adapter.h"

namespace pill_cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * kWarp;
constexpr int kChunk = 64;
constexpr int kColGroups = kThreads / kChunk;

template <typename T, int RMAX, int VEC>
__device__ __forceinline__ float down_projection(const T* __restrict__ xr, const T* __restrict__ w_down,
                                                 const T* __restrict__ norm_weight, int D, int r, bool row_vec,
                                                 int lane, float (&h)[RMAX]) {
#pragma unroll
  for (int j = 0; j < RMAX; ++j) h[j] = 0.f;
  float ss = 0.f;
  for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
    float xv[VEC], gv[VEC];
    load_vec<T, VEC>(xr + d0, xv);
    if (norm_weight != nullptr) load_vec<T, VEC>(norm_weight + d0, gv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      ss += xv[v] * xv[v];
      const float xg = norm_weight != nullptr ? xv[v] * gv[v] : xv[v];
      fma_row<T, RMAX>(h, w_down + static_cast<size_t>(d0 + v) * r, r, xg, row_vec);
    }
  }
  warp_sum(h, r);
  return warp_sum(ss);
}

template <typename T, int RMAX, int VEC>
__global__ void __launch_bounds__(kThreads)
soft_routed_forward_kernel(const T* __restrict__ x, const T* __restrict__ w_down, const T* __restrict__ b_down,
                           const T* __restrict__ w_up, const T* __restrict__ b_up,
                           const T* __restrict__ routing_weights, const T* __restrict__ dropout_mask,
                           const T* __restrict__ norm_weight, T* __restrict__ y, long long tokens, int D, int r, int E,
                           float eps, float scale, bool row_vec) {
  const int lane = threadIdx.x % kWarp;
  const long long t = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (t >= tokens) return;
  const T* xr = x + t * D;
  T* yr = y + t * D;
  const bool norm = norm_weight != nullptr;
  float z[RMAX];
  const float ss = down_projection<T, RMAX, VEC>(xr, w_down, norm_weight, D, r, row_vec, lane, z);
  const float rstd = norm ? rsqrtf(ss / static_cast<float>(D) + eps) : 1.f;
#pragma unroll
  for (int j = 0; j < RMAX; ++j) {
    if (j < r) {
      const float m = dropout_mask != nullptr ? to_float<T>(dropout_mask[t * r + j]) : 1.f;
      z[j] = (rstd * z[j] + to_float<T>(b_down[j])) * m;
    }
  }
  const T* wr = routing_weights + t * E;
  for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
    float xv[VEC], gv[VEC], mix[VEC];
    load_vec<T, VEC>(xr + d0, xv);
    if (norm) load_vec<T, VEC>(norm_weight + d0, gv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) mix[v] = 0.f;
    for (int e = 0; e < E; ++e) {
      const float we = to_float<T>(wr[e]);
      float acc[VEC];
      load_vec<T, VEC>(b_up + static_cast<size_t>(e) * D + d0, acc);
      const T* wu = w_up + static_cast<size_t>(e) * r * D + d0;
#pragma unroll
      for (int j = 0; j < RMAX; ++j) {
        if (j < r) {
          float w[VEC];
          load_vec<T, VEC>(wu + static_cast<size_t>(j) * D, w);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] += z[j] * w[v];
        }
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) mix[v] += we * acc[v];
    }
    float out[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float n = norm ? round_to<T>(round_to<T>(xv[v] * rstd) * gv[v]) : xv[v];
      out[v] = n + scale * mix[v];
    }
    store_vec<T, VEC>(yr + d0, out);
  }
}

// Per-token backward: dx, d routing_weights, and [z (r), dzpre (r), rstd] in tok_ws.
template <typename T, int RMAX, int VEC>
__global__ void __launch_bounds__(kThreads)
soft_routed_backward_token_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w_down,
                                  const T* __restrict__ b_down, const T* __restrict__ w_up,
                                  const T* __restrict__ b_up, const T* __restrict__ routing_weights,
                                  const T* __restrict__ dropout_mask, const T* __restrict__ norm_weight,
                                  T* __restrict__ dx, T* __restrict__ d_routing, float* __restrict__ tok_ws,
                                  long long tokens, int D, int r, int E, float eps, float scale, bool row_vec) {
  const int lane = threadIdx.x % kWarp;
  const long long t = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (t >= tokens) return;
  const T* xr = x + t * D;
  const T* dyr = dy + t * D;
  T* dxr = dx + t * D;
  const bool norm = norm_weight != nullptr;
  float z[RMAX], m[RMAX], dz[RMAX];
  const float ss = down_projection<T, RMAX, VEC>(xr, w_down, norm_weight, D, r, row_vec, lane, z);
  const float rstd = norm ? rsqrtf(ss / static_cast<float>(D) + eps) : 1.f;
#pragma unroll
  for (int j = 0; j < RMAX; ++j) {
    m[j] = (dropout_mask != nullptr && j < r) ? to_float<T>(dropout_mask[t * r + j]) : 1.f;
    z[j] = j < r ? (rstd * z[j] + to_float<T>(b_down[j])) * m[j] : 0.f;
    dz[j] = 0.f;
  }
  for (int e = 0; e < E; ++e) {
    float u[RMAX];
#pragma unroll
    for (int j = 0; j < RMAX; ++j) u[j] = 0.f;
    float bv = 0.f;
    const T* wu = w_up + static_cast<size_t>(e) * r * D;
    const T* bu = b_up + static_cast<size_t>(e) * D;
    for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
      float dv[VEC], b[VEC];
      load_vec<T, VEC>(dyr + d0, dv);
      load_vec<T, VEC>(bu + d0, b);
#pragma unroll
      for (int v = 0; v < VEC; ++v) bv += dv[v] * b[v];
#pragma unroll
      for (int j = 0; j < RMAX; ++j) {
        if (j < r) {
          float w[VEC];
          load_vec<T, VEC>(wu + static_cast<size_t>(j) * D + d0, w);
#pragma unroll
          for (int v = 0; v < VEC; ++v) u[j] += dv[v] * w[v];
        }
      }
    }
    warp_sum(u, r);
    bv = warp_sum(bv);
    const float we = to_float<T>(routing_weights[t * E + e]);
    float zu = bv;
#pragma unroll
    for (int j = 0; j < RMAX; ++j) {
      if (j < r) {
        zu += z[j] * u[j];
        dz[j] += scale * we * u[j];
      }
    }
    if (lane == 0) d_routing[t * E + e] = from_float<T>(scale * zu);
  }
#pragma unroll
  for (int j = 0; j < RMAX; ++j) dz[j] *= m[j];  // dz now holds d(zpre) = dz * mask
  float* ws = tok_ws + t * (2LL * r + 1);
  store_lane_spread<RMAX>(ws, z, r, lane);
  store_lane_spread<RMAX>(ws + r, dz, r, lane);
  if (lane == 0) ws[2 * r] = rstd;

  float c = 0.f;
  if (norm) {
    for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
      float xv[VEC], gv[VEC], dv[VEC];
      load_vec<T, VEC>(xr + d0, xv);
      load_vec<T, VEC>(dyr + d0, dv);
      load_vec<T, VEC>(norm_weight + d0, gv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float dn = dv[v] + dot_row<T, RMAX>(w_down + static_cast<size_t>(d0 + v) * r, dz, r, row_vec);
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
      const float dn = dv[v] + dot_row<T, RMAX>(w_down + static_cast<size_t>(d0 + v) * r, dz, r, row_vec);
      out[v] = norm ? rstd * (dn * gv[v] - xv[v] * rstd * c) : dn;
    }
    store_vec<T, VEC>(dxr + d0, out);
  }
}

// Partial slab per split: UP [E, r, D] | BUP [E, D] | S [D, r] | Q [D] | BD [r].
struct Slab {
  size_t up, bup, s, q, bd, size;
  __host__ __device__ Slab(int D, int r, int E) {
    const size_t rd = static_cast<size_t>(r) * D;
    up = 0;
    bup = up + static_cast<size_t>(E) * rd;
    s = bup + static_cast<size_t>(E) * D;
    q = s + rd;
    bd = q + D;
    size = bd + r;
  }
};

// Block (D chunk, token split, z): z < E sums the up-projection gradients of expert z, z == E those of the
// shared down-projection (S, q, and b_down in the blocks of chunk 0). Every block writes its whole tile.
template <typename T, int RMAX>
__global__ void __launch_bounds__(kThreads)
soft_routed_weight_grad_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                               const T* __restrict__ routing_weights, const float* __restrict__ tok_ws,
                               float* __restrict__ partials, long long tokens, int D, int r, int E, int splits,
                               float scale, bool norm) {
  constexpr int NI = RMAX / kColGroups;
  const int dl = threadIdx.x % kChunk, jg = threadIdx.x / kChunk;
  const int d = blockIdx.x * kChunk + dl;
  const int s = blockIdx.y, ez = blockIdx.z;
  const Slab slab(D, r, E);
  float* part = partials + static_cast<size_t>(s) * slab.size;
  long long begin, end;
  split_range(tokens, s, splits, begin, end);
  const long long stride = 2LL * r + 1;
  float acc[NI], bias[NI], q = 0.f;
#pragma unroll
  for (int i = 0; i < NI; ++i) acc[i] = bias[i] = 0.f;
  if (ez < E) {
    if (d < D) {
      for (long long t = begin; t < end; ++t) {
        const float* w = tok_ws + t * stride;
        const float c = scale * to_float<T>(routing_weights[t * E + ez]) * to_float<T>(dy[t * D + d]);
        q += c;
#pragma unroll
        for (int i = 0; i < NI; ++i) {
          const int j = jg + kColGroups * i;
          if (j < r) acc[i] += w[j] * c;
        }
      }
      const size_t rd = static_cast<size_t>(r) * D;
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int j = jg + kColGroups * i;
        if (j < r) part[slab.up + ez * rd + static_cast<size_t>(j) * D + d] = acc[i];
      }
      if (jg == 0) part[slab.bup + static_cast<size_t>(ez) * D + d] = q;
    }
  } else {
    const bool writes_bias = blockIdx.x == 0 && dl == 0;
    for (long long t = begin; t < end; ++t) {
      const float* w = tok_ws + t * stride;
      if (d < D) {
        const float xv = to_float<T>(x[t * D + d]);
        const float xh = norm ? xv * w[2 * r] : xv;
        q += to_float<T>(dy[t * D + d]) * xh;
#pragma unroll
        for (int i = 0; i < NI; ++i) {
          const int j = jg + kColGroups * i;
          if (j < r) acc[i] += xh * w[r + j];
        }
      }
      if (writes_bias) {
#pragma unroll
        for (int i = 0; i < NI; ++i) {
          const int j = jg + kColGroups * i;
          if (j < r) bias[i] += w[r + j];
        }
      }
    }
    if (d < D) {
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int j = jg + kColGroups * i;
        if (j < r) part[slab.s + static_cast<size_t>(d) * r + j] = acc[i];
      }
      if (jg == 0) part[slab.q + d] = q;
    }
    if (writes_bias) {
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int j = jg + kColGroups * i;
        if (j < r) part[slab.bd + j] = bias[i];
      }
    }
  }
}

// Sums split partials in split order: dW_down = g S, db_down, dW_up, db_up, dg.
template <typename T>
__global__ void __launch_bounds__(256)
soft_routed_reduce_kernel(const float* __restrict__ partials, const T* __restrict__ w_down,
                          const T* __restrict__ norm_weight, T* __restrict__ dw_down, T* __restrict__ db_down,
                          T* __restrict__ dw_up, T* __restrict__ db_up, T* __restrict__ dnorm, int D, int r, int E,
                          int splits) {
  const Slab slab(D, r, E);
  const size_t rd = static_cast<size_t>(r) * D;
  const size_t n_down = rd, n_bd = r, n_up = static_cast<size_t>(E) * rd, n_bup = static_cast<size_t>(E) * D;
  const size_t total = n_down + n_bd + n_up + n_bup + (norm_weight != nullptr ? D : 0);
  auto sum = [&](size_t offset) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += partials[static_cast<size_t>(s) * slab.size + offset];
    return acc;
  };
  for (size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    size_t k = idx;
    if (k < n_down) {
      float acc = sum(slab.s + k);
      if (norm_weight != nullptr) acc *= to_float<T>(norm_weight[k / r]);
      dw_down[k] = from_float<T>(acc);
      continue;
    }
    k -= n_down;
    if (k < n_bd) {
      db_down[k] = from_float<T>(sum(slab.bd + k));
      continue;
    }
    k -= n_bd;
    if (k < n_up) {
      dw_up[k] = from_float<T>(sum(slab.up + k));
      continue;
    }
    k -= n_up;
    if (k < n_bup) {
      db_up[k] = from_float<T>(sum(slab.bup + k));
      continue;
    }
    k -= n_bup;
    float acc = sum(slab.q + k);
    for (int j = 0; j < r; ++j) acc += to_float<T>(w_down[k * r + j]) * sum(slab.s + k * r + j);
    dnorm[k] = from_float<T>(acc);
  }
}

}  // namespace

cudaError_t soft_routed_adapter_forward(Dtype dtype, const void* x, const void* w_down, const void* b_down,
                                        const void* w_up, const void* b_up, const void* routing_weights,
                                        const void* dropout_mask, const void* norm_weight, void* y, long long tokens,
                                        int hidden, int rank, int experts, float eps, float scale,
                                        cudaStream_t stream) {
  if (!valid_sizes(tokens, hidden, rank, experts)) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec16<T>();
    const bool vec = rows_vectorizable(hidden, V, {x, y, w_up, b_up, norm_weight});
    const bool row_vec = rank % V == 0 && aligned16(w_down);
    return with_rank(rank, [&](auto rmax) {
      constexpr int RMAX = decltype(rmax)::value;
      const dim3 grid(blocks_for(tokens, kWarpsPerBlock));
      auto launch = [&](auto kernel) {
        PILL_LAUNCH(grid, kThreads, 0, stream, kernel)(
            static_cast<const T*>(x), static_cast<const T*>(w_down), static_cast<const T*>(b_down),
            static_cast<const T*>(w_up), static_cast<const T*>(b_up), static_cast<const T*>(routing_weights),
            static_cast<const T*>(dropout_mask), static_cast<const T*>(norm_weight), static_cast<T*>(y), tokens,
            hidden, rank, experts, eps, scale, row_vec);
        return cudaGetLastError();
      };
      return vec ? launch(soft_routed_forward_kernel<T, RMAX, V>) : launch(soft_routed_forward_kernel<T, RMAX, 1>);
    });
  });
}

int soft_routed_adapter_backward_splits(long long tokens, int hidden, int experts) {
  const long long chunks = (hidden + kChunk - 1) / kChunk;
  return choose_splits(tokens, chunks * (static_cast<long long>(experts > 0 ? experts : 0) + 1));
}

size_t soft_routed_adapter_backward_workspace_floats(long long tokens, int hidden, int rank, int experts,
                                                     int splits) {
  const size_t tok = static_cast<size_t>(tokens > 0 ? tokens : 0) * (2 * static_cast<size_t>(rank) + 1);
  return tok + static_cast<size_t>(splits) * Slab(hidden, rank, experts).size;
}

cudaError_t soft_routed_adapter_backward(Dtype dtype, const void* grad_y, const void* x, const void* w_down,
                                         const void* b_down, const void* w_up, const void* b_up,
                                         const void* routing_weights, const void* dropout_mask,
                                         const void* norm_weight, void* grad_x, void* grad_w_down,
                                         void* grad_b_down, void* grad_w_up, void* grad_b_up,
                                         void* grad_routing_weights, void* grad_norm_weight, float* workspace,
                                         int splits, long long tokens, int hidden, int rank, int experts, float eps,
                                         float scale, cudaStream_t stream) {
  if (!valid_sizes(tokens, hidden, rank, experts) || splits < 1 ||
      (norm_weight == nullptr) != (grad_norm_weight == nullptr))
    return cudaErrorInvalidValue;
  float* tok_ws = workspace;
  float* partials = workspace + static_cast<size_t>(tokens) * (2 * static_cast<size_t>(rank) + 1);
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec16<T>();
    const bool vec = rows_vectorizable(hidden, V, {x, grad_y, grad_x, w_up, b_up, norm_weight});
    const bool row_vec = rank % V == 0 && aligned16(w_down);
    return with_rank(rank, [&](auto rmax) -> cudaError_t {
      constexpr int RMAX = decltype(rmax)::value;
      if (tokens > 0) {
        const dim3 grid(blocks_for(tokens, kWarpsPerBlock));
        auto launch = [&](auto kernel) {
          PILL_LAUNCH(grid, kThreads, 0, stream, kernel)(
              static_cast<const T*>(grad_y), static_cast<const T*>(x), static_cast<const T*>(w_down),
              static_cast<const T*>(b_down), static_cast<const T*>(w_up), static_cast<const T*>(b_up),
              static_cast<const T*>(routing_weights), static_cast<const T*>(dropout_mask),
              static_cast<const T*>(norm_weight), static_cast<T*>(grad_x), static_cast<T*>(grad_routing_weights),
              tok_ws, tokens, hidden, rank, experts, eps, scale, row_vec);
          return cudaGetLastError();
        };
        const cudaError_t err = vec ? launch(soft_routed_backward_token_kernel<T, RMAX, V>)
                                    : launch(soft_routed_backward_token_kernel<T, RMAX, 1>);
        if (err != cudaSuccess) return err;
      }
      const dim3 wgrid(blocks_for(hidden, kChunk), splits, experts + 1);
      PILL_LAUNCH(wgrid, kThreads, 0, stream, soft_routed_weight_grad_kernel<T, RMAX>)(
          static_cast<const T*>(grad_y), static_cast<const T*>(x), static_cast<const T*>(routing_weights), tok_ws,
          partials, tokens, hidden, rank, experts, splits, scale, norm_weight != nullptr);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      const size_t outputs = static_cast<size_t>(rank) * hidden * (1 + experts) + rank +
                             static_cast<size_t>(experts) * hidden + (norm_weight ? hidden : 0);
      const unsigned rblocks = static_cast<unsigned>(outputs / 256 + 1 < 4096 ? outputs / 256 + 1 : 4096);
      PILL_LAUNCH(rblocks, 256, 0, stream, soft_routed_reduce_kernel<T>)(
          partials, static_cast<const T*>(w_down), static_cast<const T*>(norm_weight), static_cast<T*>(grad_w_down),
          static_cast<T*>(grad_b_down), static_cast<T*>(grad_w_up), static_cast<T*>(grad_b_up),
          static_cast<T*>(grad_norm_weight), hidden, rank, experts, splits);
      return cudaGetLastError();
    });
  });
}

}  // namespace pill_cuda
