// Register-blocked GEMM micro-kernels for the C++ CPU kernels; see cpu_gemm.h.
//
// One template, instantiated per instruction set through GCC/Clang function target attributes: the
// accumulators of a kGemmRowAlign x NB block of C stay in vector registers across the whole K loop (GCC vector
// extensions, which the compiler contracts to FMA where the target has it), B rows are loaded once per k and
// reused for every row of the block, A elements are broadcast.
#include "cpu_gemm.h"

#include <c10/util/Exception.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PILL_KERNELS_X86_MULTIVERSION 1
#else
#define PILL_KERNELS_X86_MULTIVERSION 0
#endif

namespace pill_kernels_cpu {
namespace {

constexpr int kRows = static_cast<int>(kGemmRowAlign);

// VBYTES: vector width of the instruction set; NB: columns of C per micro-kernel call (a multiple of the vector
// length, and a multiple or divisor of kGemmColAlign), chosen so that kRows * NB accumulators fit the register file.
#define PILL_DEFINE_GEMM(NAME, TARGET_ATTRIBUTE, VBYTES)                                                         \
  template <typename T, int NB, bool ACCUMULATE>                                                                 \
  TARGET_ATTRIBUTE void NAME##_micro(int64_t K, const T* __restrict A, int64_t lda, int64_t acs,                \
                                     const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc) {          \
    typedef T vec __attribute__((vector_size(VBYTES)));                                                          \
    constexpr int kLanes = VBYTES / sizeof(T);                                                                   \
    constexpr int kVecs = NB / kLanes;                                                                           \
    vec acc[kRows][kVecs];                                                                                       \
    for (int m = 0; m < kRows; ++m)                                                                              \
      for (int v = 0; v < kVecs; ++v) {                                                                          \
        if (ACCUMULATE) {                                                                                        \
          std::memcpy(&acc[m][v], C + m * ldc + v * kLanes, sizeof(vec));                                        \
        } else {                                                                                                 \
          acc[m][v] = vec{};                                                                                     \
        }                                                                                                        \
      }                                                                                                          \
    for (int64_t k = 0; k < K; ++k) {                                                                            \
      vec b[kVecs];                                                                                              \
      for (int v = 0; v < kVecs; ++v) std::memcpy(&b[v], B + k * ldb + v * kLanes, sizeof(vec));                \
      for (int m = 0; m < kRows; ++m) {                                                                          \
        const T a = A[m * lda + k * acs];                                                                        \
        for (int v = 0; v < kVecs; ++v) acc[m][v] += a * b[v];                                                   \
      }                                                                                                          \
    }                                                                                                            \
    for (int m = 0; m < kRows; ++m)                                                                              \
      for (int v = 0; v < kVecs; ++v) std::memcpy(C + m * ldc + v * kLanes, &acc[m][v], sizeof(vec));           \
  }                                                                                                              \
                                                                                                                 \
  template <typename T, int NB>                                                                                  \
  TARGET_ATTRIBUTE void NAME##_gemm(bool accumulate, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,  \
                                    int64_t acs, const T* B, int64_t ldb, T* C, int64_t ldc) {                   \
    /* Column blocks outside: a K x NB panel of B stays in cache while every row block of A passes over it. */   \
    int64_t n0 = 0;                                                                                              \
    for (; n0 + NB <= N; n0 += NB)                                                                               \
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {                                                                \
        if (accumulate) {                                                                                        \
          NAME##_micro<T, NB, true>(K, A + m0 * lda, lda, acs, B + n0, ldb, C + m0 * ldc + n0, ldc);             \
        } else {                                                                                                 \
          NAME##_micro<T, NB, false>(K, A + m0 * lda, lda, acs, B + n0, ldb, C + m0 * ldc + n0, ldc);            \
        }                                                                                                        \
      }                                                                                                          \
    /* NB may exceed kGemmColAlign (AVX-512 fp32): the last kGemmColAlign-wide columns, if any, in half blocks. */ \
    constexpr int kHalf = NB > kGemmColAlign ? NB / 2 : NB;                                                      \
    for (; n0 < N; n0 += kHalf)                                                                                  \
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {                                                                \
        if (accumulate) {                                                                                        \
          NAME##_micro<T, kHalf, true>(K, A + m0 * lda, lda, acs, B + n0, ldb, C + m0 * ldc + n0, ldc);          \
        } else {                                                                                                 \
          NAME##_micro<T, kHalf, false>(K, A + m0 * lda, lda, acs, B + n0, ldb, C + m0 * ldc + n0, ldc);         \
        }                                                                                                        \
      }                                                                                                          \
  }

PILL_DEFINE_GEMM(generic, , 16)
#if PILL_KERNELS_X86_MULTIVERSION
PILL_DEFINE_GEMM(avx2, __attribute__((target("avx2,fma"))), 32)
PILL_DEFINE_GEMM(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), 64)
#endif

// AVX512-BF16 intrinsics need GCC 10 or Clang 9; older compilers build without the bf16 products.
#if PILL_KERNELS_X86_MULTIVERSION && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define PILL_KERNELS_X86_BF16 1
#else
#define PILL_KERNELS_X86_BF16 0
#endif

#if PILL_KERNELS_X86_BF16
#define PILL_BF16_TARGET __attribute__((target("avx512bf16,avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))

// ROWS x (16 * NV) block of C in zmm accumulators; per pair of k, NV loads of packed B and one 32-bit broadcast
// of A's pair per row. ROWS * NV <= 16 accumulators leave registers for B and the broadcasts.
template <int ROWS, int NV, bool ACCUMULATE>
PILL_BF16_TARGET void bf16_micro(int64_t K, const uint16_t* __restrict A, int64_t lda, const uint16_t* __restrict B,
                                 int64_t ldb, float* __restrict C, int64_t ldc) {
  __m512 acc[ROWS][NV];
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = ACCUMULATE ? _mm512_loadu_ps(C + m * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + k * ldb + 32 * v);
    for (int m = 0; m < ROWS; ++m) {
      int32_t pair;
      std::memcpy(&pair, A + m * lda + k, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a, b[v]);
    }
  }
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + m * ldc + 16 * v, acc[m][v]);
}

template <int ROWS, int NV>
PILL_BF16_TARGET void bf16_block(bool accumulate, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                                 int64_t ldb, float* C, int64_t ldc) {
  if (accumulate) {
    bf16_micro<ROWS, NV, true>(K, A, lda, B, ldb, C, ldc);
  } else {
    bf16_micro<ROWS, NV, false>(K, A, lda, B, ldb, C, ldc);
  }
}

template <int ROWS>
PILL_BF16_TARGET void bf16_rows(bool accumulate, int64_t m0, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
                                const uint16_t* B, int64_t ldb, float* C, int64_t ldc) {
  int64_t n0 = 0;
  for (; n0 + 32 <= N; n0 += 32)
    bf16_block<ROWS, 2>(accumulate, K, A + m0 * lda, lda, B + 2 * n0, ldb, C + m0 * ldc + n0, ldc);
  if (n0 < N) bf16_block<ROWS, 1>(accumulate, K, A + m0 * lda, lda, B + 2 * n0, ldb, C + m0 * ldc + n0, ldc);
}

PILL_BF16_TARGET void avx512bf16_gemm(bool accumulate, int64_t M, int64_t N, int64_t K, const uint16_t* A,
                                      int64_t lda, const uint16_t* B, int64_t ldb, float* C, int64_t ldc) {
  // In the packed layout a pair-row of B is 2 * ldb elements; the micro-kernel steps k by 2 (B + k * ldb).
  int64_t m0 = 0;
  for (; m0 + 8 <= M; m0 += 8) bf16_rows<8>(accumulate, m0, N, K, A, lda, B, ldb, C, ldc);
  for (; m0 < M; m0 += kRows) bf16_rows<kRows>(accumulate, m0, N, K, A, lda, B, ldb, C, ldc);
}
#endif

enum class Isa { kGeneric, kAvx2, kAvx512, kAvx512Bf16 };

Isa detect_isa() {
#if PILL_KERNELS_X86_MULTIVERSION
  __builtin_cpu_init();
  // libgcc's and compiler-rt's feature bits also check that the OS saves the vector registers (XGETBV).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
#if PILL_KERNELS_X86_BF16
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
#else
    return Isa::kAvx512;
#endif
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16:
      return "avx512bf16";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

Isa current_isa() {
  static const Isa best = detect_isa();
  const char* requested = std::getenv("PILL_KERNELS_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return best;
  const std::string name(requested);
  Isa wanted;
  if (name == "generic") {
    wanted = Isa::kGeneric;
  } else if (name == "avx2") {
    wanted = Isa::kAvx2;
  } else if (name == "avx512") {
    wanted = Isa::kAvx512;
  } else if (name == "avx512bf16") {
    wanted = Isa::kAvx512Bf16;
  } else {
    TORCH_CHECK(false, "PILL_KERNELS_CPU_ISA must be generic, avx2, avx512 or avx512bf16, got '", name, "'");
  }
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(best), "PILL_KERNELS_CPU_ISA=", name,
              " but this CPU (or this build) supports at most ", isa_name(best));
  return wanted;
}

}  // namespace

template <>
GemmFn<float> select_gemm<float>() {
  switch (current_isa()) {
#if PILL_KERNELS_X86_MULTIVERSION
    case Isa::kAvx512Bf16:
    case Isa::kAvx512:
      return &avx512_gemm<float, 32>;
    case Isa::kAvx2:
      return &avx2_gemm<float, 16>;
#endif
    default:
      return &generic_gemm<float, 8>;
  }
}

template <>
GemmFn<double> select_gemm<double>() {
  switch (current_isa()) {
#if PILL_KERNELS_X86_MULTIVERSION
    case Isa::kAvx512Bf16:
    case Isa::kAvx512:
      return &avx512_gemm<double, 16>;
    case Isa::kAvx2:
      return &avx2_gemm<double, 8>;
#endif
    default:
      return &generic_gemm<double, 4>;
  }
}

const char* selected_gemm_isa() { return isa_name(current_isa()); }

Bf16GemmFn select_bf16_gemm() {
#if PILL_KERNELS_X86_BF16
  if (current_isa() == Isa::kAvx512Bf16) return &avx512bf16_gemm;
#endif
  return nullptr;
}

}  // namespace pill_kernels_cpu
