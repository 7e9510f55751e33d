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
// variable PILL_KERNELS_CPU_ISA (generic | avx2 | avx512), which lets tests run every variant on one machine.
// Read on every call (cheap next to an op) so that a test can switch it.
template <typename T>
GemmFn<T> select_gemm();

// Name of the instruction set select_gemm picks now.
const char* selected_gemm_isa();

}  // namespace pill_kernels_cpu
