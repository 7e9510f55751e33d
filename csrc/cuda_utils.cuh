// Device helpers shared by the pill-kernels CUDA kernels (pure CUDA: no torch headers).
//
// Conventions of every kernel here:
// - fp32 accumulation for float16 / bfloat16 / float32 inputs; values are rounded to the element type only
//   where the reference (pill_kernels/reference.py) rounds them or where they are stored.
// - Per-token work runs one warp per token; reductions over the hidden size D are lane-strided partial sums
//   followed by a butterfly (xor) shuffle reduction. The butterfly is deterministic and leaves the identical
//   sum in every lane (each step adds the same two operands, in commuted order, on both partner lanes).
// - Reductions across tokens (weight gradients) never use float atomics: each block writes its partial to a
//   workspace slab and a second kernel sums the slabs in a fixed order, so two runs are bitwise equal.
// - 16-byte vector accesses are a template choice (VEC elements per access) taken at launch only when every
//   row base is 16-byte aligned and the row length is a multiple of VEC; otherwise the scalar instantiation
//   runs (D need not be a multiple of 8).
#pragma once

#ifdef PILL_CUDA_EMULATION
// The tests' CPU emulator of these kernels (tests/cuda_emulation/): same sources, no GPU.
#include "cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "pill_cuda.h"

// Every launch is written PILL_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...), so that the
// emulator can run it as a function call.
#ifdef PILL_CUDA_EMULATION
#define PILL_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::pill_emu::launch(grid, block, shared_bytes, stream, __VA_ARGS__)
#else
#define PILL_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif

namespace pill_cuda {

constexpr int kWarp = 32;

// The block's dynamic shared memory (the launch's shared_bytes).
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef PILL_CUDA_EMULATION
  return ::pill_emu::dynamic_smem<T>();
#else
  extern __shared__ __align__(16) unsigned char pill_dynamic_smem[];
  return reinterpret_cast<T*>(pill_dynamic_smem);
#endif
}
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Rounds through the element type: reproduces the reference's intermediate casts (RMSNorm in half types).
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float<T>(from_float<T>(v)); }

// VEC consecutive elements as floats. VEC * sizeof(T) == 16 means one 16-byte load (the caller guarantees
// alignment); VEC == 1 is the scalar path.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const int4 raw = *reinterpret_cast<const int4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float<T>(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float<T>(p[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    int4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(in[i]);
    *reinterpret_cast<int4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_float<T>(in[i]);
  }
}

// Elements per 16-byte access.
template <typename T> __host__ __device__ constexpr int vec16() { return static_cast<int>(16 / sizeof(T)); }

// acc[j] += s * row[j] for j < r: one row of a [D, r] weight (contiguous r values). `row_vec` (uniform across
// the warp) says rows are 16-byte aligned and r is a multiple of the vector width, so 16-byte loads apply.
// RMAX is a compile-time bound so that acc stays in registers (indexed only by unrolled constants).
template <typename T, int RMAX>
__device__ __forceinline__ void fma_row(float (&acc)[RMAX], const T* __restrict__ row, int r, float s, bool row_vec) {
  constexpr int V = vec16<T>();
  static_assert(RMAX % V == 0, "RMAX must be a multiple of the 16-byte vector width");
  if (row_vec) {
#pragma unroll
    for (int j0 = 0; j0 < RMAX; j0 += V) {
      if (j0 < r) {
        float w[V];
        load_vec<T, V>(row + j0, w);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[j0 + v] += s * w[v];
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < RMAX; ++j)
      if (j < r) acc[j] += s * to_float<T>(row[j]);
  }
}

// sum_j row[j] * c[j] for j < r (same layout rules as fma_row).
template <typename T, int RMAX>
__device__ __forceinline__ float dot_row(const T* __restrict__ row, const float (&c)[RMAX], int r, bool row_vec) {
  constexpr int V = vec16<T>();
  float s = 0.f;
  if (row_vec) {
#pragma unroll
    for (int j0 = 0; j0 < RMAX; j0 += V) {
      if (j0 < r) {
        float w[V];
        load_vec<T, V>(row + j0, w);
#pragma unroll
        for (int v = 0; v < V; ++v) s += w[v] * c[j0 + v];
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < RMAX; ++j)
      if (j < r) s += to_float<T>(row[j]) * c[j];
  }
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <int N>
__device__ __forceinline__ void warp_sum(float (&v)[N], int live) {
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (j < live) v[j] = warp_sum(v[j]);
}

// Writes vals[j] (j < r, identical in every lane) to dst[j], spreading the stores over the lanes.
template <int RMAX>
__device__ __forceinline__ void store_lane_spread(float* __restrict__ dst, const float (&vals)[RMAX], int r, int lane) {
#pragma unroll
  for (int j = 0; j < RMAX; ++j)
    if (j < r && (j % kWarp) == lane) dst[j] = vals[j];
}

__device__ __forceinline__ float sigmoidf_acc(float z) { return 1.f / (1.f + expf(-z)); }

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// Number of token splits of a weight-gradient pass: enough blocks to fill the device a few times over,
// never more splits than token groups of 32 (smaller groups would make the workspace larger than the work).
inline int choose_splits(long long tokens, long long blocks_per_split) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && v > 0) sms = v;
  }
  const long long target = 8LL * sms;
  long long s = (target + blocks_per_split - 1) / (blocks_per_split > 0 ? blocks_per_split : 1);
  const long long by_tokens = (tokens + 31) / 32;
  if (s > by_tokens) s = by_tokens;
  if (s > 64) s = 64;
  if (s < 1) s = 1;
  return static_cast<int>(s);
}

// Tokens [begin, end) of split s out of `splits` contiguous ranges.
__device__ __forceinline__ void split_range(long long tokens, int s, int splits, long long& begin, long long& end) {
  const long long per = (tokens + splits - 1) / splits;
  begin = per * s;
  end = begin + per < tokens ? begin + per : tokens;
}

// Runs f(T{}) with the element type named by `dtype` (the tag value only carries the type).
template <typename F>
cudaError_t with_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat32: return f(float{});
    case Dtype::kFloat16: return f(__half{});
    case Dtype::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Runs f(std::integral_constant<int, RMAX>{}) with the compiled register bound RMAX >= rank. One bound
// (kMaxRank): loops over r are guarded by j < r, so smaller ranks cost predicated-off iterations only.
template <typename F>
cudaError_t with_rank(int rank, F&& f) {
  if (rank < 1 || rank > kMaxRank) return cudaErrorInvalidValue;
  return f(std::integral_constant<int, kMaxRank>{});
}

// Rows of length D starting at each pointer (and every D elements after it) take VEC-element 16-byte accesses.
inline bool rows_vectorizable(int D, int vec, std::initializer_list<const void*> rows) {
  if (D % vec != 0) return false;
  for (const void* p : rows)
    if (!aligned16(p)) return false;
  return true;
}

// E lands in gridDim.z of the weight-gradient passes (at most 65535).
inline bool valid_sizes(long long tokens, int D, int r, int E) {
  return tokens >= 0 && D >= 1 && r >= 1 && r <= kMaxRank && E >= 1 && E < 65535;
}

inline unsigned blocks_for(long long items, int per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

}  // namespace pill_cuda
