// Types shared by the launchers' headers (csrc/<op>.h) and their torch bindings (csrc/<op>_cuda.cpp).
// Plain C++ and the CUDA runtime API only: no torch types here, so the .cu files stay torch-free and the
// bindings need no CUDA device code.
#pragma once

#include <cuda_runtime_api.h>

namespace pill_cuda {

// Element type of the activations and weights of one call (all of one call's floating tensors share it).
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest adapter bottleneck r the CUDA kernels take (PILL uses 32, LaVIN 8): each lane keeps r partial sums
// per projection in registers, the loops over r are unrolled to this bound, and each further bound is another
// full set of instantiations (64 was tried: it spilled and doubled the build time). Larger r is refused with
// a clear error by the bindings; the Triton and eager backends take any r.
constexpr int kMaxRank = 32;

}  // namespace pill_cuda
