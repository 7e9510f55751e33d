// PILL's modality attention gate on values:  v[t, h, :] *= tanh(x[t] W_gate[:, h])  for image tokens only.
//
// Design: one warp per token. Text tokens are a copy (forward) or pass-through gradient (backward) and skip the
// gate projection entirely. Image tokens compute the H gate logits with lanes striding over D (x in 16-byte
// vectors where aligned), heads in groups of kHeadGroup accumulators so register use does not depend on H;
// the gates live in shared memory for the scaling pass over the token's H * hd values.
// Backward: per token d gate[h] = sum_k grad_out v, dlogit = d gate (1 - gate^2), dv = grad_out * gate (or
// grad_out for text), dx = dlogit W_gate^T; dlogit goes to an fp32 workspace and dW_gate = sum_t x^T dlogit is
// summed per (D chunk, head group, token split) into partials that a second kernel adds in a fixed order
// (deterministic, no float atomics).
// Floor: one read of v and x rows and one write of out (image tokens), D * H FMAs per image token: bandwidth-
// bound at LLaMA shapes (H = 32: 2 flop per byte of x).
#include "cuda_utils.cuh"
#include "modality_gate.h"

namespace pill_cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * kWarp;
constexpr int kHeadGroup = 8;
// Weight-gradient tiles: 32 consecutive d by kHeadGroup heads per block.
constexpr int kGradD = kThreads / kHeadGroup;

// gate[h] = tanh(x . W_gate[:, h]) for every h < H into shared memory (all lanes see the result after the call).
template <typename T, int VEC>
__device__ __forceinline__ void gates(const T* __restrict__ xr, const T* __restrict__ w, int D, int H, int lane,
                                      float* __restrict__ gate) {
  for (int h0 = 0; h0 < H; h0 += kHeadGroup) {
    float acc[kHeadGroup];
#pragma unroll
    for (int i = 0; i < kHeadGroup; ++i) acc[i] = 0.f;
    for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
      float xv[VEC];
      load_vec<T, VEC>(xr + d0, xv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const T* row = w + static_cast<size_t>(d0 + v) * H + h0;
#pragma unroll
        for (int i = 0; i < kHeadGroup; ++i)
          if (h0 + i < H) acc[i] += xv[v] * to_float<T>(row[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < kHeadGroup; ++i) {
      if (h0 + i < H) {
        const float s = warp_sum(acc[i]);
        if (lane == 0) gate[h0 + i] = tanhf(s);
      }
    }
  }
  __syncwarp();
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
modality_gate_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ v,
                             const bool* __restrict__ image_mask, T* __restrict__ out, long long tokens, int D, int H,
                             int hd) {
  float* smem = dynamic_smem<float>();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const long long t = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= tokens) return;
  const long long L = static_cast<long long>(H) * hd;
  const T* vr = v + t * L;
  T* outr = out + t * L;
  if (!image_mask[t]) {
    for (long long k0 = lane * VEC; k0 < L; k0 += kWarp * VEC) {
      float vv[VEC];
      load_vec<T, VEC>(vr + k0, vv);
      store_vec<T, VEC>(outr + k0, vv);
    }
    return;
  }
  float* gate = smem + warp * H;
  gates<T, VEC>(x + t * D, w, D, H, lane, gate);
  for (long long k0 = lane * VEC; k0 < L; k0 += kWarp * VEC) {
    float vv[VEC];
    load_vec<T, VEC>(vr + k0, vv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) vv[i] *= gate[(k0 + i) / hd];
    store_vec<T, VEC>(outr + k0, vv);
  }
}

// Per-token backward: dv, dx, and dlogit [T, H] (zero for text tokens) in the workspace.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
modality_gate_backward_token_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                    const T* __restrict__ w, const T* __restrict__ v,
                                    const bool* __restrict__ image_mask, T* __restrict__ grad_x,
                                    T* __restrict__ grad_v, float* __restrict__ dlogit, long long tokens, int D, int H,
                                    int hd) {
  float* smem = dynamic_smem<float>();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const long long t = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= tokens) return;
  const long long L = static_cast<long long>(H) * hd;
  const T* gor = grad_out + t * L;
  const T* vr = v + t * L;
  T* gvr = grad_v + t * L;
  T* dxr = grad_x + t * D;
  float* dl_row = dlogit + t * H;
  if (!image_mask[t]) {
    for (long long k0 = lane * VEC; k0 < L; k0 += kWarp * VEC) {
      float g[VEC];
      load_vec<T, VEC>(gor + k0, g);
      store_vec<T, VEC>(gvr + k0, g);
    }
    for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
      float zero[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) zero[i] = 0.f;
      store_vec<T, VEC>(dxr + d0, zero);
    }
    for (int h = lane; h < H; h += kWarp) dl_row[h] = 0.f;
    return;
  }
  float* gate = smem + 2 * warp * H;
  float* dl = gate + H;
  gates<T, VEC>(x + t * D, w, D, H, lane, gate);
  for (int h = 0; h < H; ++h) {
    const float g = gate[h];
    float s = 0.f;
    for (int k = lane; k < hd; k += kWarp) {
      const long long i = static_cast<long long>(h) * hd + k;
      const float go = to_float<T>(gor[i]);
      s += go * to_float<T>(vr[i]);
      gvr[i] = from_float<T>(go * g);
    }
    s = warp_sum(s);
    if (lane == 0) {
      const float d = s * (1.f - g * g);
      dl[h] = d;
      dl_row[h] = d;
    }
  }
  __syncwarp();
  for (int d0 = lane * VEC; d0 < D; d0 += kWarp * VEC) {
    float out[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const T* row = w + static_cast<size_t>(d0 + i) * H;
      float acc = 0.f;
      for (int h = 0; h < H; ++h) acc += dl[h] * to_float<T>(row[h]);
      out[i] = acc;
    }
    store_vec<T, VEC>(dxr + d0, out);
  }
}

// Block (D chunk of kGradD, head group, token split): partial dW_gate over the split's image tokens.
template <typename T>
__global__ void __launch_bounds__(kThreads)
modality_gate_weight_grad_kernel(const T* __restrict__ x, const bool* __restrict__ image_mask,
                                 const float* __restrict__ dlogit, float* __restrict__ partials, long long tokens,
                                 int D, int H, int splits) {
  const int d = blockIdx.x * kGradD + threadIdx.x % kGradD;
  const int h = blockIdx.y * kHeadGroup + threadIdx.x / kGradD;
  const int s = blockIdx.z;
  if (d >= D || h >= H) return;
  long long begin, end;
  split_range(tokens, s, splits, begin, end);
  float acc = 0.f;
  for (long long t = begin; t < end; ++t) {
    if (!image_mask[t]) continue;
    acc += to_float<T>(x[t * D + d]) * dlogit[t * H + h];
  }
  partials[static_cast<size_t>(s) * D * H + static_cast<size_t>(d) * H + h] = acc;
}

template <typename T>
__global__ void __launch_bounds__(256)
modality_gate_reduce_kernel(const float* __restrict__ partials, T* __restrict__ grad_w, int D, int H, int splits) {
  const size_t total = static_cast<size_t>(D) * H;
  for (size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += partials[static_cast<size_t>(s) * total + idx];
    grad_w[idx] = from_float<T>(acc);
  }
}

bool valid_gate_sizes(long long tokens, int D, int H, int hd) {
  // Two H-float arrays per warp in shared memory must fit the default 48 KiB.
  return tokens >= 0 && D >= 1 && H >= 1 && hd >= 1 && 2LL * kWarpsPerBlock * H * sizeof(float) <= 48 * 1024 &&
         (H + kHeadGroup - 1) / kHeadGroup < 65535;
}

}  // namespace

cudaError_t modality_gate_forward(Dtype dtype, const void* x, const void* w_gate, const void* v,
                                  const bool* image_mask, void* out, long long tokens, int hidden, int heads,
                                  int head_dim, cudaStream_t stream) {
  if (!valid_gate_sizes(tokens, hidden, heads, head_dim)) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vec16<T>();
    const bool vec = rows_vectorizable(hidden, V, {x}) && (static_cast<long long>(heads) * head_dim) % V == 0 &&
                     aligned16(v) && aligned16(out);
    const dim3 grid(blocks_for(tokens, kWarpsPerBlock));
    const size_t smem = static_cast<size_t>(kWarpsPerBlock) * heads * sizeof(float);
    auto launch = [&](auto kernel) {
      PILL_LAUNCH(grid, kThreads, smem, stream, kernel)(static_cast<const T*>(x), static_cast<const T*>(w_gate),
                                                        static_cast<const T*>(v), image_mask, static_cast<T*>(out),
                                                        tokens, hidden, heads, head_dim);
      return cudaGetLastError();
    };
    return vec ? launch(modality_gate_forward_kernel<T, V>) : launch(modality_gate_forward_kernel<T, 1>);
  });
}

int modality_gate_backward_splits(long long tokens, int hidden, int heads) {
  const long long blocks = ((hidden + kGradD - 1) / kGradD) * static_cast<long long>((heads + kHeadGroup - 1) / kHeadGroup);
  return choose_splits(tokens, blocks);
}

size_t modality_gate_backward_workspace_floats(long long tokens, int hidden, int heads, int splits) {
  return static_cast<size_t>(tokens > 0 ? tokens : 0) * heads + static_cast<size_t>(splits) * hidden * heads;
}

cudaError_t modality_gate_backward(Dtype dtype, const void* grad_out, const void* x, const void* w_gate,
                                   const void* v, const bool* image_mask, void* grad_x, void* grad_w_gate,
                                   void* grad_v, float* workspace, int splits, long long tokens, int hidden,
                                   int heads, int head_dim, cudaStream_t stream) {
  if (!valid_gate_sizes(tokens, hidden, heads, head_dim) || splits < 1) return cudaErrorInvalidValue;
  float* dlogit = workspace;
  float* partials = workspace + static_cast<size_t>(tokens) * heads;
  return with_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    constexpr int V = vec16<T>();
    const bool vec = rows_vectorizable(hidden, V, {x, grad_x}) && (static_cast<long long>(heads) * head_dim) % V == 0 &&
                     aligned16(grad_out) && aligned16(grad_v);
    if (tokens > 0) {
      const dim3 grid(blocks_for(tokens, kWarpsPerBlock));
      const size_t smem = 2 * static_cast<size_t>(kWarpsPerBlock) * heads * sizeof(float);
      auto launch = [&](auto kernel) {
        PILL_LAUNCH(grid, kThreads, smem, stream, kernel)(
            static_cast<const T*>(grad_out), static_cast<const T*>(x), static_cast<const T*>(w_gate),
            static_cast<const T*>(v), image_mask, static_cast<T*>(grad_x), static_cast<T*>(grad_v), dlogit, tokens,
            hidden, heads, head_dim);
        return cudaGetLastError();
      };
      const cudaError_t err = vec ? launch(modality_gate_backward_token_kernel<T, V>)
                                  : launch(modality_gate_backward_token_kernel<T, 1>);
      if (err != cudaSuccess) return err;
    }
    const dim3 wgrid(blocks_for(hidden, kGradD), blocks_for(heads, kHeadGroup), splits);
    PILL_LAUNCH(wgrid, kThreads, 0, stream, modality_gate_weight_grad_kernel<T>)(
        static_cast<const T*>(x), image_mask, dlogit, partials, tokens, hidden, heads, splits);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const size_t outputs = static_cast<size_t>(hidden) * heads;
    const unsigned rblocks = static_cast<unsigned>(outputs / 256 + 1 < 4096 ? outputs / 256 + 1 : 4096);
    PILL_LAUNCH(rblocks, 256, 0, stream, modality_gate_reduce_kernel<T>)(partials, static_cast<T*>(grad_w_gate),
                                                                         hidden, heads, splits);
    return cudaGetLastError();
  });
}

}  // namespace pill_cuda
