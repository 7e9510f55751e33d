// Tensor-core kernels of the hard-routed GLU adapter (routed_glu_adapter.cu chooses between them and the
// CUDA-core kernels of routed_glu_adapter_cuda_core.cu):
//
//   n = RMSNorm(x; g, eps) or x;   y[t] = n[t] + W_up[e](SiLU(n[t] W_gate[e]) * (n[t] W_down[e])),  e = ids[t]
//
// For float16 / bfloat16, r in {16, 32}, D a multiple of 64, 16-byte aligned rows: WMMA m16n16k16 on tiles of
// 16-64 tokens (mma_rows), looping over the experts present in the tile (one inside an image or text run; each
// on its own rows at a boundary, the other rows zeroed), as the Triton kernel does.
// - Forward: pass 1 over 64-wide D chunks multiplies (x g) [ROWS x 64] by the W_down and W_gate chunks
//   [64 x r] (one warp per 16 token rows), the loaders summing x^2 for rstd on the way; the GLU runs on the
//   [ROWS x r] accumulators in shared memory; pass 2 multiplies act [ROWS x r] by W_up chunks [r x 64] and adds
//   the skip n. Operands are rounded to T (as the reference's matmuls round theirs), accumulation is fp32.
//   Pass 2 re-reads x for the skip; it walks the chunks backwards, so the ones pass 1 read last are still in
//   L2 (at 5 blocks per SM a 64-column step of every resident block is ~5 MB: a few steps fit the 50 MB L2).
// - Backward, per-token kernel: pass 1 also multiplies dy by W_up^T (W_up chunk read as a col-major B) and
//   sums dy g x per row, so the norm's mean(dn g xhat) is known after it (see the CUDA-core kernel);
//   pass 2 computes dn = dy + dh_down W_down^T + dh_gate W_gate^T per chunk and writes dx. The per-token
//   vectors go to the same workspace as the CUDA-core kernel's.
// - Backward, weight gradients: per (D chunk, token split, expert) the products a^T dy and xhat^T dh over the
//   split's token tiles, written to the same partial slabs as the CUDA-core kernel's, so the fixed-order
//   reduction kernel is shared and the result stays deterministic.
// Floor arithmetic (H100, D = 4096, r = 32, bf16): at the byte floor (4 D bytes per token forward, x in and y
// out: ~205 M tokens/s at 3.35 TB/s) the 6 D r flops per token are ~160 TFLOP/s, ~16% of the dense bf16
// tensor-core peak; the backward (16 D r flops against ~10 D bytes) ~17%. Bandwidth-bound, as intended.
#include <cstdlib>

#include "routed_glu_adapter.cuh"

namespace pill_cuda {
namespace {

namespace wmma = nvcuda::wmma;

// Forward and per-token backward: ROWS tokens per block (16, 32 or 64: one warp per 16 rows, two threads per
// row for the loaders), chosen per call by mma_rows(). Weight gradients: kMmaRows-token tiles, 4 warps.
constexpr int kMmaRows = 64;
constexpr int kMmaWarps = kMmaRows / 16;
constexpr int kMmaThreads = kMmaWarps * kWarp;
constexpr int kLdTile = kMmaChunk + 8;   // T [rows x 64] tiles: 144-byte rows keep 16-byte alignment, skew banks
constexpr int kLdTileF = kMmaChunk + 4;  // float [rows x 64]
template <int R> __host__ __device__ constexpr int ld_rank() { return R + 8; }    // T [rows x R]
template <int R> __host__ __device__ constexpr int ld_rank_f() { return R + 4; }  // float [rows x R]

template <typename T> using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T> using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
template <typename T> using FragAt = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// The range of (valid) expert ids present in a tile.
struct TileRows {
  int lo, hi;
};

// Copies the tile's ids to ids_s (-1 beyond T; 0 for every token when ids is null, E = 1) and returns their range.
template <int ROWS>
__device__ __forceinline__ TileRows tile_rows(const int64_t* __restrict__ ids, long long row0, long long tokens,
                                              int E, long long* __restrict__ ids_s) {
  for (int i = threadIdx.x; i < ROWS; i += blockDim.x) {
    const long long t = row0 + i;
    ids_s[i] = t < tokens ? (ids != nullptr ? ids[t] : 0) : -1;
  }
  __syncthreads();
  int lo = E, hi = -1;
  for (int i = 0; i < ROWS; ++i) {
    const long long e = ids_s[i];
    if (e >= 0 && e < E) {
      lo = e < lo ? static_cast<int>(e) : lo;
      hi = e > hi ? static_cast<int>(e) : hi;
    }
  }
  return {lo, hi};
}

// Loader layout of [ROWS x 64] tiles (2 ROWS threads): thread i takes row i / 2, columns 32 (i % 2) .. +32 as four
// 8-element vectors; the two threads of a row are neighbouring lanes, so per-row sums combine with one xor shuffle.
__device__ __forceinline__ int loader_row() { return threadIdx.x / 2; }
__device__ __forceinline__ int loader_col() { return (threadIdx.x % 2) * 32; }

// dst = round_T(src * g) (or src) over this thread's 32 columns, zeros where !take; adds sum src^2 to sumsq.
template <typename T>
__device__ __forceinline__ void load_scaled_slice(const T* __restrict__ src, const T* __restrict__ g, bool take,
                                                  T* __restrict__ dst, float& sumsq) {
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    float xv[8], out[8];
    if (take) {
      load_vec<T, 8>(src + 8 * v, xv);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) xv[i] = 0.f;
    }
    if (g != nullptr) {
      float gv[8];
      load_vec<T, 8>(g + 8 * v, gv);
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = xv[i] * gv[i];
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = xv[i];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sumsq += xv[i] * xv[i];
    store_vec<T, 8>(dst + 8 * v, out);
  }
}

// Copies rows x cols elements (cols a multiple of 8) from src (row stride ld_src) to dst (row stride ld_dst),
// 16 bytes per thread step.
template <typename T>
__device__ __forceinline__ void copy_tile(const T* __restrict__ src, int ld_src, T* __restrict__ dst, int ld_dst,
                                          int rows, int cols) {
  const int vecs = cols / 8;
  for (int i = threadIdx.x; i < rows * vecs; i += blockDim.x) {
    const int row = i / vecs, c = (i % vecs) * 8;
    *reinterpret_cast<int4*>(dst + row * ld_dst + c) =
        *reinterpret_cast<const int4*>(src + static_cast<size_t>(row) * ld_src + c);
  }
}

// Expert e's slices of the stacked [E, D, r] / [E, r, D] weights.
template <typename T>
struct ExpertWeights {
  const T *down, *gate, *up;
};

template <typename T>
__device__ __forceinline__ ExpertWeights<T> expert_weights(const T* w_down, const T* w_gate, const T* w_up, int e,
                                                          int D, int r) {
  const size_t offset = static_cast<size_t>(e) * D * r;
  return {w_down + offset, w_gate + offset, w_up + offset};
}

// Whether any of the tile's rows belongs to expert e (uniform over the block).
template <int ROWS>
__device__ __forceinline__ bool tile_holds(const long long* __restrict__ ids_s, int e) {
  bool any = false;
  for (int i = 0; i < ROWS; ++i) any |= ids_s[i] == e;
  return any;
}

template <int N>
__device__ __forceinline__ void zero_fragments(FragC (&f)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) wmma::fill_fragment(f[j], 0.f);
}

// A warp's [16 x 16 N] accumulators into dst (row stride ld), fragment j at column 16 j.
template <int N>
__device__ __forceinline__ void store_fragments(float* __restrict__ dst, const FragC (&f)[N], int ld) {
#pragma unroll
  for (int j = 0; j < N; ++j) wmma::store_matrix_sync(dst + 16 * j, f[j], ld, wmma::mem_row_major);
}

// The W_down and W_gate rows d0 .. d0 + 64 of one expert ([D x R] each) into shared [64 x LDR] tiles.
template <typename T, int R>
__device__ __forceinline__ void load_down_gate_chunk(const T* __restrict__ wd, const T* __restrict__ wg, int d0,
                                                     T* __restrict__ wds, T* __restrict__ wgs) {
  copy_tile<T>(wd + static_cast<size_t>(d0) * R, R, wds, ld_rank<R>(), kMmaChunk, R);
  copy_tile<T>(wg + static_cast<size_t>(d0) * R, R, wgs, ld_rank<R>(), kMmaChunk, R);
}

// One 16-deep step of (x g) W_down and (x g) W_gate for a warp's 16 rows: a holds its (x g) columns k .. k + 16.
template <typename T, int R>
__device__ __forceinline__ void mma_down_gate_step(const FragA<T>& a, const T* __restrict__ wds,
                                                   const T* __restrict__ wgs, int k, FragC (&hd)[R / 16],
                                                   FragC (&hg)[R / 16]) {
  constexpr int LDR = ld_rank<R>();
#pragma unroll
  for (int j = 0; j < R / 16; ++j) {
    FragB<T> b;
    wmma::load_matrix_sync(b, wds + k * LDR + 16 * j, LDR);
    wmma::mma_sync(hd[j], a, b, hd[j]);
    wmma::load_matrix_sync(b, wgs + k * LDR + 16 * j, LDR);
    wmma::mma_sync(hg[j], a, b, hg[j]);
  }
}

// Rows whose id is out of range get NaN (the CUDA-core kernels' contract; only with PILL_KERNELS_CHECKS=0).
template <int ROWS, typename T>
__device__ __forceinline__ void nan_bad_rows(const long long* __restrict__ ids_s, long long row0, int E, T* out,
                                             int D) {
  for (int i = 0; i < ROWS; ++i) {
    const long long e = ids_s[i];
    if (e == -1 || (e >= 0 && e < E)) continue;
    for (int d = threadIdx.x; d < D; d += blockDim.x)
      out[(row0 + i) * D + d] = from_float<T>(__int_as_float(0x7fc00000));
  }
}

template <typename T, int R, int ROWS>
struct MmaForwardSmem {
  // Pass 1 (x g, W_down, W_gate chunks) and, after it, the GLU inputs [ROWS x R] fp32; pass 2 reuses the front
  // for the W_up chunk and the output tile.
  static constexpr int kX = 0;
  static constexpr int kWd = kX + ROWS * kLdTile * 2;
  static constexpr int kWg = kWd + kMmaChunk * ld_rank<R>() * 2;
  static constexpr int kHd = kWg + kMmaChunk * ld_rank<R>() * 2;
  static constexpr int kHg = kHd + ROWS * ld_rank_f<R>() * 4;
  static constexpr int kAct = kHg + ROWS * ld_rank_f<R>() * 4;
  static constexpr int kRstd = kAct + ROWS * ld_rank<R>() * 2;
  static constexpr int kIds = kRstd + ROWS * 4;
  static constexpr int kBytes = kIds + ROWS * 8;
  static constexpr int kWu = 0;
  static constexpr int kOut = kWu + R * kLdTile * 2;
  static_assert(kOut + ROWS * kLdTileF * 4 <= kAct, "pass 2 overlaps the activations");
  static_assert(kBytes <= 48 * 1024, "static shared memory above 48 KiB");
};

template <typename T, int R, int ROWS>
__global__ void __launch_bounds__(ROWS * 2)
routed_glu_forward_mma_kernel(const T* __restrict__ x, const T* __restrict__ w_down, const T* __restrict__ w_gate,
                              const T* __restrict__ w_up, const int64_t* __restrict__ expert_ids,
                              const T* __restrict__ norm_weight, T* __restrict__ y, long long tokens, int D, int E,
                              float eps) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using S = MmaForwardSmem<T, R, ROWS>;
  constexpr int NJ = R / 16, LDR = ld_rank<R>(), LDRF = ld_rank_f<R>();
  __shared__ __align__(128) unsigned char smem[S::kBytes];
  T* xs = reinterpret_cast<T*>(smem + S::kX);
  T* wds = reinterpret_cast<T*>(smem + S::kWd);
  T* wgs = reinterpret_cast<T*>(smem + S::kWg);
  float* hds = reinterpret_cast<float*>(smem + S::kHd);
  float* hgs = reinterpret_cast<float*>(smem + S::kHg);
  T* acts = reinterpret_cast<T*>(smem + S::kAct);
  float* rstds = reinterpret_cast<float*>(smem + S::kRstd);
  long long* ids_s = reinterpret_cast<long long*>(smem + S::kIds);
  T* wus = reinterpret_cast<T*>(smem + S::kWu);
  float* outs = reinterpret_cast<float*>(smem + S::kOut);

  const long long row0 = static_cast<long long>(blockIdx.x) * ROWS;
  const int warp = threadIdx.x / kWarp;
  const int row = loader_row(), col = loader_col();
  const long long t = row0 + row;
  const bool norm = norm_weight != nullptr;
  const TileRows present = tile_rows<ROWS>(expert_ids, row0, tokens, E, ids_s);

  for (int e = present.lo; e <= present.hi; ++e) {
    if (!tile_holds<ROWS>(ids_s, e)) continue;
    const bool mine = ids_s[row] == e;
    const ExpertWeights<T> w = expert_weights(w_down, w_gate, w_up, e, D, R);
    const T *wd = w.down, *wg = w.gate, *wu = w.up;

    FragC hd[NJ], hg[NJ];
    zero_fragments(hd);
    zero_fragments(hg);
    float sumsq = 0.f;
    for (int d0 = 0; d0 < D; d0 += kMmaChunk) {
      __syncthreads();  // the previous chunk's fragments are loaded
      load_scaled_slice<T>(x + t * D + d0 + col, norm ? norm_weight + d0 + col : nullptr, mine,
                           xs + row * kLdTile + col, sumsq);
      load_down_gate_chunk<T, R>(wd, wg, d0, wds, wgs);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kMmaChunk; k += 16) {
        FragA<T> a;
        wmma::load_matrix_sync(a, xs + warp * 16 * kLdTile + k, kLdTile);
        mma_down_gate_step<T, R>(a, wds, wgs, k, hd, hg);
      }
    }
    store_fragments(hds + warp * 16 * LDRF, hd, LDRF);
    store_fragments(hgs + warp * 16 * LDRF, hg, LDRF);
    sumsq += __shfl_xor_sync(kFullMask, sumsq, 1);
    const float rstd = norm ? rsqrtf(sumsq / static_cast<float>(D) + eps) : 1.f;
    if (threadIdx.x % 2 == 0) rstds[row] = rstd;
    __syncwarp();  // the warp's stored accumulators (its own 16 rows) are visible to its lanes
    // act = SiLU(rstd hg) * (rstd hd), rounded to T for the second product; this thread's row and half of r.
    for (int j = (threadIdx.x % 2) * (R / 2); j < (threadIdx.x % 2 + 1) * (R / 2); ++j) {
      const float zg = rstd * hgs[row * LDRF + j];
      acts[row * LDR + j] = from_float<T>(zg * sigmoidf_acc(zg) * (rstd * hds[row * LDRF + j]));
    }
    __syncthreads();  // pass 1's buffers are free; act is complete

    for (int d0 = D - kMmaChunk; d0 >= 0; d0 -= kMmaChunk) {  // newest chunks first: L2 hits
      copy_tile<T>(wu + d0, D, wus, kLdTile, R, kMmaChunk);
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kMmaChunk / 16; ++c) {
        FragC acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int k = 0; k < R; k += 16) {
          FragA<T> a;
          FragB<T> b;
          wmma::load_matrix_sync(a, acts + warp * 16 * LDR + k, LDR);
          wmma::load_matrix_sync(b, wus + k * kLdTile + 16 * c, kLdTile);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(outs + warp * 16 * kLdTileF + 16 * c, acc, kLdTileF, wmma::mem_row_major);
      }
      __syncwarp();  // each warp's epilogue reads only its own 16 rows of the output tile
      if (mine) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int c = col + 8 * v;
          float xv[8], out[8];
          load_vec<T, 8>(x + t * D + d0 + c, xv);
          if (norm) {
            float gv[8];
            load_vec<T, 8>(norm_weight + d0 + c, gv);
#pragma unroll
            for (int i = 0; i < 8; ++i) xv[i] = round_to<T>(round_to<T>(xv[i] * rstds[row]) * gv[i]);
          }
#pragma unroll
          for (int i = 0; i < 8; ++i) out[i] = xv[i] + outs[row * kLdTileF + c + i];
          store_vec<T, 8>(y + t * D + d0 + c, out);
        }
      }
      __syncthreads();  // W_up chunk and output tile are reused by the next chunk
    }
  }
  nan_bad_rows<ROWS, T>(ids_s, row0, E, y, D);
#endif
}

template <typename T, int R, int ROWS>
struct MmaBackwardSmem {
  // Pass 1: x g, dy, W_down, W_gate [64 x R] and W_up [R x 64] chunks; then the three [ROWS x R] fp32 products
  // over the same bytes. Pass 2: W_down, W_gate chunks and the dn tile, again from the front.
  static constexpr int kX = 0;
  static constexpr int kDy = kX + ROWS * kLdTile * 2;
  static constexpr int kWd = kDy + ROWS * kLdTile * 2;
  static constexpr int kWg = kWd + kMmaChunk * ld_rank<R>() * 2;
  static constexpr int kWu = kWg + kMmaChunk * ld_rank<R>() * 2;
  static constexpr int kPass1End = kWu + R * kLdTile * 2;
  static constexpr int kHd = 0;
  static constexpr int kHg = kHd + ROWS * ld_rank_f<R>() * 4;
  static constexpr int kGa = kHg + ROWS * ld_rank_f<R>() * 4;
  static_assert(kGa + ROWS * ld_rank_f<R>() * 4 <= kPass1End, "products overflow pass 1's buffers");
  static constexpr int kDhd = kPass1End;
  static constexpr int kDhg = kDhd + ROWS * ld_rank<R>() * 2;
  static constexpr int kRow = kDhg + ROWS * ld_rank<R>() * 2;  // rstd, c per row
  static constexpr int kIds = kRow + 2 * ROWS * 4;
  static constexpr int kBytes = kIds + ROWS * 8;
  static constexpr int kWd2 = 0;
  static constexpr int kWg2 = kWd2 + kMmaChunk * ld_rank<R>() * 2;
  static constexpr int kDn = kWg2 + kMmaChunk * ld_rank<R>() * 2;
  static_assert(kDn + ROWS * kLdTileF * 4 <= kPass1End, "pass 2 overflows pass 1's buffers");
  static_assert(kBytes <= 48 * 1024, "static shared memory above 48 KiB");
};

template <typename T, int R, int ROWS>
__global__ void __launch_bounds__(ROWS * 2)
routed_glu_backward_token_mma_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w_down,
                                     const T* __restrict__ w_gate, const T* __restrict__ w_up,
                                     const int64_t* __restrict__ expert_ids, const T* __restrict__ norm_weight,
                                     T* __restrict__ dx, float* __restrict__ tok_ws, long long tokens, int D, int E,
                                     float eps) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using S = MmaBackwardSmem<T, R, ROWS>;
  constexpr int NJ = R / 16, LDR = ld_rank<R>(), LDRF = ld_rank_f<R>();
  __shared__ __align__(128) unsigned char smem[S::kBytes];
  T* xs = reinterpret_cast<T*>(smem + S::kX);
  T* dys = reinterpret_cast<T*>(smem + S::kDy);
  T* wds = reinterpret_cast<T*>(smem + S::kWd);
  T* wgs = reinterpret_cast<T*>(smem + S::kWg);
  T* wus = reinterpret_cast<T*>(smem + S::kWu);
  float* hds = reinterpret_cast<float*>(smem + S::kHd);
  float* hgs = reinterpret_cast<float*>(smem + S::kHg);
  float* gas = reinterpret_cast<float*>(smem + S::kGa);
  T* dhds = reinterpret_cast<T*>(smem + S::kDhd);
  T* dhgs = reinterpret_cast<T*>(smem + S::kDhg);
  float* rstds = reinterpret_cast<float*>(smem + S::kRow);
  float* cs = rstds + ROWS;
  long long* ids_s = reinterpret_cast<long long*>(smem + S::kIds);
  T* wds2 = reinterpret_cast<T*>(smem + S::kWd2);
  T* wgs2 = reinterpret_cast<T*>(smem + S::kWg2);
  float* dns = reinterpret_cast<float*>(smem + S::kDn);

  const long long row0 = static_cast<long long>(blockIdx.x) * ROWS;
  const int warp = threadIdx.x / kWarp;
  const int row = loader_row(), col = loader_col();
  const long long t = row0 + row;
  const bool norm = norm_weight != nullptr;
  const TileRows present = tile_rows<ROWS>(expert_ids, row0, tokens, E, ids_s);

  for (int e = present.lo; e <= present.hi; ++e) {
    if (!tile_holds<ROWS>(ids_s, e)) continue;
    const bool mine = ids_s[row] == e;
    const ExpertWeights<T> w = expert_weights(w_down, w_gate, w_up, e, D, R);
    const T *wd = w.down, *wg = w.gate, *wu = w.up;

    FragC hd[NJ], hg[NJ], ga[NJ];
    zero_fragments(hd);
    zero_fragments(hg);
    zero_fragments(ga);
    float sumsq = 0.f, dygx = 0.f;  // sum x^2 and sum dy g x over this thread's slice of the row
    for (int d0 = 0; d0 < D; d0 += kMmaChunk) {
      __syncthreads();
      load_scaled_slice<T>(x + t * D + d0 + col, norm ? norm_weight + d0 + col : nullptr, mine,
                           xs + row * kLdTile + col, sumsq);
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        float dv[8];
        if (mine) {
          load_vec<T, 8>(dy + t * D + d0 + col + 8 * v, dv);
          if (norm) {
            float xv[8], gv[8];
            load_vec<T, 8>(x + t * D + d0 + col + 8 * v, xv);
            load_vec<T, 8>(norm_weight + d0 + col + 8 * v, gv);
#pragma unroll
            for (int i = 0; i < 8; ++i) dygx += dv[i] * gv[i] * xv[i];
          }
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) dv[i] = 0.f;
        }
        store_vec<T, 8>(dys + row * kLdTile + col + 8 * v, dv);
      }
      load_down_gate_chunk<T, R>(wd, wg, d0, wds, wgs);
      copy_tile<T>(wu + d0, D, wus, kLdTile, R, kMmaChunk);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kMmaChunk; k += 16) {
        FragA<T> a, g;
        wmma::load_matrix_sync(a, xs + warp * 16 * kLdTile + k, kLdTile);
        wmma::load_matrix_sync(g, dys + warp * 16 * kLdTile + k, kLdTile);
        mma_down_gate_step<T, R>(a, wds, wgs, k, hd, hg);
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          FragBt<T> bt;  // (W_up chunk)^T: element (d, j) of [64 x R] is wus[j][d]
          wmma::load_matrix_sync(bt, wus + 16 * j * kLdTile + k, kLdTile);
          wmma::mma_sync(ga[j], g, bt, ga[j]);
        }
      }
    }
    __syncthreads();  // every warp is done with pass 1's operands before the products overwrite them
    store_fragments(hds + warp * 16 * LDRF, hd, LDRF);
    store_fragments(hgs + warp * 16 * LDRF, hg, LDRF);
    store_fragments(gas + warp * 16 * LDRF, ga, LDRF);
    sumsq += __shfl_xor_sync(kFullMask, sumsq, 1);
    const float rstd = norm ? rsqrtf(sumsq / static_cast<float>(D) + eps) : 1.f;
    __syncwarp();
    // The GLU derivative on this thread's half of the row; the workspace takes [a, dh_down, dh_gate, rstd].
    float* ws = tok_ws + t * (3LL * R + 1);
    float corr = 0.f;  // sum_j dh_down (x g W_down) + dh_gate (x g W_gate), for the norm's mean
    for (int j = (threadIdx.x % 2) * (R / 2); j < (threadIdx.x % 2 + 1) * (R / 2); ++j) {
      const float hdr = hds[row * LDRF + j], hgr = hgs[row * LDRF + j];
      const float zd = rstd * hdr, zg = rstd * hgr;
      const float sig = sigmoidf_acc(zg);
      const float s = zg * sig;
      const float da = gas[row * LDRF + j];
      const float dh_down = da * s;
      const float dh_gate = da * zd * sig * (1.f + zg * (1.f - sig));
      corr += dh_down * hdr + dh_gate * hgr;
      dhds[row * LDR + j] = from_float<T>(dh_down);
      dhgs[row * LDR + j] = from_float<T>(dh_gate);
      if (mine) {
        ws[j] = s * zd;
        ws[R + j] = dh_down;
        ws[2 * R + j] = dh_gate;
      }
    }
    corr += __shfl_xor_sync(kFullMask, corr, 1);
    dygx += __shfl_xor_sync(kFullMask, dygx, 1);
    if (threadIdx.x % 2 == 0) {
      rstds[row] = rstd;
      // mean over d of dn g xhat = rstd (sum_d dy g x + corr) / D
      cs[row] = norm ? rstd * (dygx + corr) / static_cast<float>(D) : 0.f;
      if (mine) ws[3 * R] = rstd;
    }
    __syncthreads();  // dh tiles complete; pass 1's buffers free

    for (int d0 = D - kMmaChunk; d0 >= 0; d0 -= kMmaChunk) {  // newest chunks first: L2 hits
      load_down_gate_chunk<T, R>(wd, wg, d0, wds2, wgs2);
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kMmaChunk / 16; ++c) {
        FragC acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int k = 0; k < R; k += 16) {
          FragA<T> a;
          FragBt<T> b;  // (W chunk)^T: element (j, d) of [R x 64] is w[d][j]
          wmma::load_matrix_sync(a, dhds + warp * 16 * LDR + k, LDR);
          wmma::load_matrix_sync(b, wds2 + 16 * c * LDR + k, LDR);
          wmma::mma_sync(acc, a, b, acc);
          wmma::load_matrix_sync(a, dhgs + warp * 16 * LDR + k, LDR);
          wmma::load_matrix_sync(b, wgs2 + 16 * c * LDR + k, LDR);
          wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(dns + warp * 16 * kLdTileF + 16 * c, acc, kLdTileF, wmma::mem_row_major);
      }
      __syncwarp();
      if (mine) {
        const float rs = rstds[row], cr = cs[row];
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int c = col + 8 * v;
          float dv[8], out[8];
          load_vec<T, 8>(dy + t * D + d0 + c, dv);
#pragma unroll
          for (int i = 0; i < 8; ++i) out[i] = dv[i] + dns[row * kLdTileF + c + i];
          if (norm) {
            float xv[8], gv[8];
            load_vec<T, 8>(x + t * D + d0 + c, xv);
            load_vec<T, 8>(norm_weight + d0 + c, gv);
#pragma unroll
            for (int i = 0; i < 8; ++i) out[i] = rs * (out[i] * gv[i] - xv[i] * rs * cr);
          }
          store_vec<T, 8>(dx + t * D + d0 + c, out);
        }
      }
      __syncthreads();
    }
  }
  nan_bad_rows<ROWS, T>(ids_s, row0, E, dx, D);
#endif
}

template <typename T, int R>
struct MmaWeightGradSmem {
  static constexpr int kDy = 0;
  static constexpr int kXhat = kDy + kMmaRows * kLdTile * 2;
  static constexpr int kAct = kXhat + kMmaRows * kLdTile * 2;
  static constexpr int kDhd = kAct + kMmaRows * ld_rank<R>() * 2;
  static constexpr int kDhg = kDhd + kMmaRows * ld_rank<R>() * 2;
  static constexpr int kIds = kDhg + kMmaRows * ld_rank<R>() * 2;
  static constexpr int kBytes = kIds + kMmaRows * 8;
  static constexpr int kQ = 0;  // at the end: per-thread column sums of dy xhat [128 threads x 32]
  static_assert(kQ + kMmaThreads * 33 * 4 <= kIds, "the q reduction overflows the tiles");
  static_assert(kBytes <= 48 * 1024, "static shared memory above 48 KiB");
};

// Block (64-column D chunk, token split, expert): over the split's 64-token tiles that hold tokens of the
// expert (other rows zeroed), with tensor cores,
//   dW_up[:, chunk] += a^T dy,  S_down[chunk, :] += xhat^T dh_down,  S_gate[chunk, :] += xhat^T dh_gate
// (a, dh_* and rstd from the per-token workspace; xhat = x rstd rounded to T as the reference rounds n), and
// q[chunk] += column sums of dy xhat. Every block writes its whole slab tile, zeros when it had no tokens,
// straight from the fragments (the partials are 256-bit aligned, see partials_offset in routed_glu_adapter.cu).
template <typename T, int R>
__global__ void __launch_bounds__(kMmaThreads)
routed_glu_weight_grad_mma_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                  const int64_t* __restrict__ expert_ids, const float* __restrict__ tok_ws,
                                  float* __restrict__ partials, long long tokens, int D, int E, int splits, bool norm) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using S = MmaWeightGradSmem<T, R>;
  constexpr int NJ = R / 16, LDR = ld_rank<R>();
  __shared__ __align__(128) unsigned char smem[S::kBytes];
  T* dys = reinterpret_cast<T*>(smem + S::kDy);
  T* xs = reinterpret_cast<T*>(smem + S::kXhat);
  T* as = reinterpret_cast<T*>(smem + S::kAct);
  T* dhds = reinterpret_cast<T*>(smem + S::kDhd);
  T* dhgs = reinterpret_cast<T*>(smem + S::kDhg);
  long long* ids_s = reinterpret_cast<long long*>(smem + S::kIds);
  float* qs = reinterpret_cast<float*>(smem + S::kQ);

  const int d0 = blockIdx.x * kMmaChunk, s = blockIdx.y, e = blockIdx.z;
  const int warp = threadIdx.x / kWarp;
  const int row = loader_row(), col = loader_col();
  const long long stride = 3LL * R + 1;
  long long begin, end;
  split_range(tokens, s, splits, begin, end);

  // Warp w owns dW_up[:, 16w..16w+16) (NJ fragments down r) and S_down, S_gate[16w..16w+16, :] (NJ each).
  FragC up[NJ], sd[NJ], sg[NJ];
  zero_fragments(up);
  zero_fragments(sd);
  zero_fragments(sg);
  float q[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) q[i] = 0.f;

  for (long long row0 = begin; row0 < end; row0 += kMmaRows) {
    __syncthreads();  // the previous tile's fragments are loaded
    for (int i = threadIdx.x; i < kMmaRows; i += blockDim.x) {
      const long long t = row0 + i;
      ids_s[i] = t < end ? (expert_ids != nullptr ? expert_ids[t] : 0) : -1;
    }
    __syncthreads();
    if (!tile_holds<kMmaRows>(ids_s, e)) continue;
    const long long t = row0 + row;
    const bool mine = ids_s[row] == e;
    const float* w = tok_ws + t * stride;
    const float rstd = mine && norm ? w[3 * R] : 1.f;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int c = col + 8 * v;
      float xv[8], dv[8];
      if (mine) {
        load_vec<T, 8>(x + t * D + d0 + c, xv);
        load_vec<T, 8>(dy + t * D + d0 + c, dv);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) xv[i] = dv[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        xv[i] = norm ? round_to<T>(xv[i] * rstd) : xv[i];
        q[8 * v + i] += dv[i] * xv[i];
      }
      store_vec<T, 8>(xs + row * kLdTile + c, xv);
      store_vec<T, 8>(dys + row * kLdTile + c, dv);
    }
    // This thread's half of the row's r-vectors.
    for (int j = (threadIdx.x % 2) * (R / 2); j < (threadIdx.x % 2 + 1) * (R / 2); ++j) {
      as[row * LDR + j] = from_float<T>(mine ? w[j] : 0.f);
      dhds[row * LDR + j] = from_float<T>(mine ? w[R + j] : 0.f);
      dhgs[row * LDR + j] = from_float<T>(mine ? w[2 * R + j] : 0.f);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMmaRows; k += 16) {
      FragB<T> b;
      wmma::load_matrix_sync(b, dys + k * kLdTile + 16 * warp, kLdTile);
      FragAt<T> xt;  // xhat^T: element (d, t) is xs[t][d]
      wmma::load_matrix_sync(xt, xs + k * kLdTile + 16 * warp, kLdTile);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        FragAt<T> at;  // a^T: element (j, t) is as[t][j]
        wmma::load_matrix_sync(at, as + k * LDR + 16 * j, LDR);
        wmma::mma_sync(up[j], at, b, up[j]);
        FragB<T> h;
        wmma::load_matrix_sync(h, dhds + k * LDR + 16 * j, LDR);
        wmma::mma_sync(sd[j], xt, h, sd[j]);
        wmma::load_matrix_sync(h, dhgs + k * LDR + 16 * j, LDR);
        wmma::mma_sync(sg[j], xt, h, sg[j]);
      }
    }
  }

  float* slab = partials + (static_cast<size_t>(s) * E + e) * slab_floats(D, R);
  const size_t rd = static_cast<size_t>(R) * D;
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    wmma::store_matrix_sync(slab + static_cast<size_t>(16 * j) * D + d0 + 16 * warp, up[j], D, wmma::mem_row_major);
    wmma::store_matrix_sync(slab + rd + static_cast<size_t>(d0 + 16 * warp) * R + 16 * j, sd[j], R,
                            wmma::mem_row_major);
    wmma::store_matrix_sync(slab + 2 * rd + static_cast<size_t>(d0 + 16 * warp) * R + 16 * j, sg[j], R,
                            wmma::mem_row_major);
  }
  // q: the 64 row-threads of each column half sum in a fixed order.
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 32; ++i) qs[threadIdx.x * 33 + i] = q[i];
  __syncthreads();
  if (threadIdx.x < kMmaChunk) {
    const int c = threadIdx.x, half = c / 32;
    float acc = 0.f;
    for (int r = 0; r < kMmaRows; ++r) acc += qs[(2 * r + half) * 33 + c % 32];
    slab[3 * rd + d0 + c] = acc;
  }
#endif
}

// Token rows per block of the tensor-core forward and per-token backward: the most rows (fewest weight reads per
// token) that still give every SM about four blocks, so that small T does not leave SMs idle or with too few
// bytes in flight. Occupancy arithmetic, not a measurement; PILL_KERNELS_CUDA_MMA_ROWS=16|32|64 overrides it.
int mma_rows(long long tokens) {
  const char* env = std::getenv("PILL_KERNELS_CUDA_MMA_ROWS");
  if (env != nullptr) {
    const int rows = std::atoi(env);
    if (rows == 16 || rows == 32 || rows == 64) return rows;
  }
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && v > 0) sms = v;
  }
  const long long blocks_wanted = 4LL * sms;
  return tokens >= 64 * blocks_wanted ? 64 : tokens >= 32 * blocks_wanted ? 32 : 16;
}

// Runs f(r, rows) with both as std::integral_constant (r in {16, 32}, rows in {16, 32, 64}).
template <typename F>
cudaError_t with_mma_shape(int rank, int rows, F&& f) {
  auto by_rows = [&](auto r) {
    switch (rows) {
      case 16: return f(r, std::integral_constant<int, 16>{});
      case 32: return f(r, std::integral_constant<int, 32>{});
      default: return f(r, std::integral_constant<int, 64>{});
    }
  };
  return rank == 16 ? by_rows(std::integral_constant<int, 16>{}) : by_rows(std::integral_constant<int, 32>{});
}

// Runs f(T{}) with the half type named by `dtype`, the only element types the tensor-core kernels take.
template <typename F>
cudaError_t with_half_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat16: return f(__half{});
    case Dtype::kBFloat16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_routed_glu_forward_mma(Dtype dtype, const void* x, const void* w_down, const void* w_gate,
                                          const void* w_up, const int64_t* expert_ids, const void* norm_weight,
                                          void* y, long long tokens, int hidden, int rank, int experts, float eps,
                                          cudaStream_t stream) {
  return with_half_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_mma_shape(rank, mma_rows(tokens), [&](auto r, auto rows) {
      constexpr int R = decltype(r)::value, ROWS = decltype(rows)::value;
      PILL_LAUNCH(blocks_for(tokens, ROWS), 2 * ROWS, 0, stream, routed_glu_forward_mma_kernel<T, R, ROWS>)(
          static_cast<const T*>(x), static_cast<const T*>(w_down), static_cast<const T*>(w_gate),
          static_cast<const T*>(w_up), expert_ids, static_cast<const T*>(norm_weight), static_cast<T*>(y),
          tokens, hidden, experts, eps);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_routed_glu_backward_token_mma(Dtype dtype, const void* grad_y, const void* x, const void* w_down,
                                                 const void* w_gate, const void* w_up, const int64_t* expert_ids,
                                                 const void* norm_weight, void* grad_x, float* tok_ws,
                                                 long long tokens, int hidden, int rank, int experts, float eps,
                                                 cudaStream_t stream) {
  return with_half_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_mma_shape(rank, mma_rows(tokens), [&](auto r, auto rows) {
      constexpr int R = decltype(r)::value, ROWS = decltype(rows)::value;
      constexpr auto kernel = routed_glu_backward_token_mma_kernel<T, R, ROWS>;
      PILL_LAUNCH(blocks_for(tokens, ROWS), 2 * ROWS, 0, stream, kernel)(
          static_cast<const T*>(grad_y), static_cast<const T*>(x), static_cast<const T*>(w_down),
          static_cast<const T*>(w_gate), static_cast<const T*>(w_up), expert_ids,
          static_cast<const T*>(norm_weight), static_cast<T*>(grad_x), tok_ws, tokens, hidden, experts, eps);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_routed_glu_weight_grad_mma(Dtype dtype, const void* grad_y, const void* x,
                                              const int64_t* expert_ids, const float* tok_ws, float* partials,
                                              long long tokens, int hidden, int rank, int experts, int splits,
                                              bool norm, cudaStream_t stream) {
  return with_half_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel) {
      PILL_LAUNCH(dim3(hidden / kMmaChunk, splits, experts), kMmaThreads, 0, stream, kernel)(
          static_cast<const T*>(grad_y), static_cast<const T*>(x), expert_ids, tok_ws, partials, tokens, hidden,
          experts, splits, norm);
      return cudaGetLastError();
    };
    return rank == 16 ? launch(routed_glu_weight_grad_mma_kernel<T, 16>)
                      : launch(routed_glu_weight_grad_mma_kernel<T, 32>);
  });
}

}  // namespace pill_cuda
