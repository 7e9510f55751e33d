// Helpers shared by the C++ CPU kernels: argument checks with messages naming the argument, the RMSNorm row
// transform with transformers' rounding order, and the fixed chunking of tokens that makes weight gradients
// independent of the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace pill_kernels_cpu {

inline void check_float_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the C++ CPU kernel, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ",
              name, " must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  check_float_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name,
                        const char* meaning) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", meaning, " = ", expected, ", got ",
              t.sizes());
}

// Tokens are cut into chunks of a size that depends on the token count only (never on the thread count);
// each chunk sums its weight-gradient contributions into its own buffer and the buffers are added in chunk
// order, so gradients are bitwise reproducible and equal for any number of threads. About kTargetChunks
// chunks keep both cores busy while bounding the partial buffers.
constexpr int64_t kTileTokens = 32;
constexpr int64_t kTargetChunks = 16;

inline int64_t chunk_tokens(int64_t tokens) {
  const int64_t per_chunk = kTileTokens * kTargetChunks;
  const int64_t tiles = std::max<int64_t>(1, (tokens + per_chunk - 1) / per_chunk);
  return tiles * kTileTokens;
}

// Uninitialised scratch (zeroed where the kernels need zeros): std::vector would zero it serially.
template <typename T>
std::unique_ptr<T[]> scratch(int64_t size) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(size, 1))]);
}

// Sum of squares of a row with independent lanes (vectorisable without reassociation, fixed order).
template <typename scalar_t, typename acc_t>
acc_t sum_of_squares(const scalar_t* row, int64_t size) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= size; k += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(row[k + l]);
      lanes[l] += v * v;
    }
  for (; k < size; ++k) {
    const acc_t v = static_cast<acc_t>(row[k]);
    lanes[0] += v * v;
  }
  acc_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// v rounded to the nearest bf16 (ties to even) and widened back: c10::BFloat16's rounding in 32-bit lanes and
// without its branch, so that loops of it vectorise (a NaN stays a NaN).
inline float round_to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  float rounded;
  std::memcpy(&rounded, &bits, sizeof(rounded));
  return v != v ? v : rounded;
}

// static_cast<acc_t>(static_cast<scalar_t>(v)): v rounded to scalar_t's precision.
template <typename scalar_t, typename acc_t>
acc_t round_through(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

template <>
inline float round_through<c10::BFloat16, float>(float v) {
  return round_to_bf16(v);
}

// RMSNorm of one row with the rounding order of transformers' LlamaRMSNorm (reference.rms_norm): normalise in
// the accumulation type, round to the input type, scale by the weight, round again. The casts through
// scalar_t are no-ops for float and double. Writes n and the rounded normalised row xr (for the backward);
// returns rstd.
template <typename scalar_t, typename acc_t>
acc_t rms_norm_row(const scalar_t* x, const acc_t* weight, int64_t size, double eps, acc_t* n, acc_t* xr) {
  const acc_t mean_square = sum_of_squares<scalar_t, acc_t>(x, size) / static_cast<acc_t>(size);
  const acc_t rstd = static_cast<acc_t>(1) / std::sqrt(mean_square + static_cast<acc_t>(eps));
  for (int64_t k = 0; k < size; ++k) {
    const acc_t normalised = round_through<scalar_t, acc_t>(static_cast<acc_t>(x[k]) * rstd);
    if (xr != nullptr) xr[k] = normalised;
    n[k] = round_through<scalar_t, acc_t>(weight[k] * normalised);
  }
  return rstd;
}

// dx of the RMSNorm from dn, given the row's normalised values xr and rstd; accumulates d weight into dweight.
template <typename scalar_t, typename acc_t>
void rms_norm_row_backward(const acc_t* dn, const acc_t* xr, acc_t rstd, const acc_t* weight, int64_t size,
                           scalar_t* dx, acc_t* dweight) {
  // The dot product in independent lanes: vectorisable without reassociation, summed in a fixed order.
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= size; k += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += dn[k + l] * weight[k + l] * xr[k + l];
  for (; k < size; ++k) lanes[0] += dn[k] * weight[k] * xr[k];
  acc_t dot = 0;
  for (int l = 0; l < kLanes; ++l) dot += lanes[l];
  for (k = 0; k < size; ++k) dweight[k] += dn[k] * xr[k];
  const acc_t mean_dot = dot / static_cast<acc_t>(size);
  for (k = 0; k < size; ++k) dx[k] = static_cast<scalar_t>(rstd * (dn[k] * weight[k] - xr[k] * mean_dot));
}

// out[0:size] = sum over c of parts[c * part_stride + 0:size], added in the order of c (deterministic), for the
// chunk indices chunks[0:count]; contiguous rows, so the additions vectorise.
template <typename acc_t>
void sum_partials(const acc_t* parts, int64_t part_stride, const int64_t* chunks, int64_t count, int64_t size,
                  acc_t* out) {
  std::fill(out, out + size, acc_t(0));
  for (int64_t i = 0; i < count; ++i) {
    const acc_t* part = parts + chunks[i] * part_stride;
    for (int64_t j = 0; j < size; ++j) out[j] += part[j];
  }
}

template <typename scalar_t, typename acc_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const scalar_t* data = t.data_ptr<scalar_t>();
  std::vector<acc_t> out(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) out[i] = static_cast<acc_t>(data[i]);
  return out;
}

// Packs a row-major [rows, cols] matrix (scalar_t) into an acc_t buffer with leading dimension ld, optionally
// transposed (out[c][r] = in[r][c]); the caller zero-fills the padding. Transposes go in square blocks so that
// both the reads and the strided writes stay within a few cache lines.
template <typename scalar_t, typename acc_t>
void pack(const scalar_t* in, int64_t rows, int64_t cols, bool transpose, acc_t* out, int64_t ld) {
  if (!transpose) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) out[i * ld + j] = static_cast<acc_t>(in[i * cols + j]);
    return;
  }
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock)
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      const int64_t i1 = std::min(rows, i0 + kBlock), j1 = std::min(cols, j0 + kBlock);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) out[j * ld + i] = static_cast<acc_t>(in[i * cols + j]);
    }
}

template <typename acc_t>
acc_t sigmoid(acc_t v) {
  return static_cast<acc_t>(1) / (static_cast<acc_t>(1) + std::exp(-v));
}

}  // namespace pill_kernels_cpu
