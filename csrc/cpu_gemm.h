// Small dense matrix products shared by the C++ CPU kernels (pill_kernels_C, CPU dispatch key).
//
// The adapters' work is a handful of skinny products per tile of tokens (D x r, r x D with r ~ 32). They are
// computed here with register-blocked micro-kernels compiled for several x86 instruction sets and chosen at
// run time, so that the extension is built with portable flags (no -march) and still uses AVX2/AVX-512 where
// the CPU has them. Operands are packed by the callers: row-major, M a multiple of kGemmRowAlign and N a
// multiple of kGemmColAlign (padding rows/columns are zero), so the micro-kernels have no edge cases.
#pragma once

#include <cstdint>

namespace pill_kernels_cpu {

constexpr int64_t kGemmRowAlign = 4;
constexpr int64_t kGemmColAlign = 16;

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// C[M, N] = A[M, K] B[K, N] (accumulate = false) or C += A B (accumulate = true). A[m][k] is
// A[m * lda + k * a_col_stride]: a_col_stride = 1 for a row-major A, lda = 1 for a transposed one (A^T products
// such as the weight gradients n^T du then need no transposed copy). B and C are row-major; strides in elements.
template <typename T>
using GemmFn = void (*)(bool accumulate, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                        int64_t a_col_stride, const T* B, int64_t ldb, T* C, int64_t ldc);

// The micro-kernels for this CPU: the widest instruction set it supports, or the one named by the environment
// variable PILL_KERNELS_CPU_ISA (generic | avx2 | avx512 | avx512bf16), which lets tests run every variant on one
// machine (avx512bf16 runs fp32 and fp64 products as avx512 does).
// Read on every call (cheap next to an op) so that a test can switch it.
template <typename T>
GemmFn<T> select_gemm();

// Name of the instruction set select_gemm picks now.
const char* selected_gemm_isa();

// bf16 products with fp32 accumulation, for CPUs with AVX512-BF16 (vdpbf16ps: 2 products per fp32 lane and
// instruction, as oneDNN's bf16 GEMMs use). C[M, N] (fp32) = or += A[M, K] B[K, N] with A row-major bf16 (lda in
// elements; A[m][k], A[m][k+1] adjacent) and B in pair-interleaved ("VNNI") layout: B[k][n] at
// B[(k / 2) * 2 * ldb + 2 * n + k % 2] (ldb: columns of the packed B). bf16 values are raw uint16_t bits. M must
// be a multiple of kGemmRowAlign, N of kGemmColAlign, K even (zero padding). The products of bf16 numbers are
// exact in fp32: only the order of the fp32 sums (and flushed denormals) differs from an fp32 GEMM of the same
// bf16 values.
using Bf16GemmFn = void (*)(bool accumulate, int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
                            const uint16_t* B, int64_t ldb, float* C, int64_t ldc);

// The bf16 product when the instruction set chosen now (as select_gemm) is avx512bf16, else nullptr: the
// callers then convert their bf16 data to fp32 and use select_gemm<float>.
Bf16GemmFn select_bf16_gemm();

}  // namespace pill_kernels_cpu
