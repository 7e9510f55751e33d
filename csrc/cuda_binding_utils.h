// Input checks shared by the torch bindings of the CUDA kernels (csrc/*_cuda.cpp). Torch code: never include
// this from a .cu file (the .cu files stay torch-free so CI can compile them with plain nvcc).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <limits>

#ifdef PILL_CUDA_EMULATION
// The tests' CPU emulator (tests/cuda_emulation/): these bindings then take CPU tensors and register in
// pill_kernels_C_cuda_emulated instead of pill_kernels_C, for every backend key so that tensors on another
// device reach the bindings' device checks (as CPU tensors reach the real CUDA bindings' checks).
#include "cuda_emulation.h"
#define PILL_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pill_kernels_C_cuda_emulated, CompositeExplicitAutograd, m)
#else
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#define PILL_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pill_kernels_C, CUDA, m)
#endif

#include "pill_cuda.h"

namespace pill_cuda {

inline Dtype dtype_of(const char* op, const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": the CUDA backend takes float16, bfloat16 or float32 inputs, got x of dtype ",
                  x.scalar_type(), "; use backend='eager' (or 'triton') for other dtypes");
  }
  return Dtype::kFloat32;  // unreachable
}

#ifdef PILL_CUDA_EMULATION
inline bool on_kernel_device(const at::Tensor& x) { return x.is_cpu(); }
// Makes x's device current for the launches (a no-op in the emulator).
struct KernelDeviceGuard {
  explicit KernelDeviceGuard(const at::Tensor&) {}
};
inline cudaStream_t kernel_stream(const at::Tensor&) { return nullptr; }
#else
inline bool on_kernel_device(const at::Tensor& x) { return x.is_cuda(); }
struct KernelDeviceGuard {
  explicit KernelDeviceGuard(const at::Tensor& x) : guard(x.device()) {}
  c10::cuda::CUDAGuard guard;
};
inline cudaStream_t kernel_stream(const at::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}
#endif

// x itself: on a CUDA device, 2-D [T, D], contiguous.
inline void check_input(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(on_kernel_device(x), op, ": ", name, " must be a CUDA tensor for the CUDA backend, got device ",
              x.device());
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D [T, D], got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Any other tensor: on x's device, of `dtype`, of exactly `shape`, contiguous.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                       at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; move them to the same device");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_rank(const char* op, int64_t rank) {
  TORCH_CHECK(rank >= 1 && rank <= kMaxRank, op, ": the CUDA kernels take an adapter bottleneck r in [1, ",
              kMaxRank, "], got r=", rank, "; use backend='triton' or 'eager' for larger r");
}

inline int checked_int(const char* op, const char* what, int64_t v) {
  TORCH_CHECK(v >= 0 && v <= INT32_MAX, op, ": ", what, " must fit in 32 bits, got ", v);
  return static_cast<int>(v);
}

inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel failed to launch: ", cudaGetErrorString(err));
}

// Outputs and workspaces are uninitialised; in the emulator they start as NaN, so that an element a kernel
// fails to write (or a workspace slot read before it is written) shows in the tests' results.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef PILL_CUDA_EMULATION
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
#else
  return at::empty(sizes, options);
#endif
}

inline at::Tensor float_workspace(const at::Tensor& x, size_t floats) {
  return new_output({static_cast<int64_t>(floats)}, x.options().dtype(at::kFloat));
}

}  // namespace pill_cuda
