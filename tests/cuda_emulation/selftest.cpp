// Kernels that exercise the emulator itself (tests/test_cuda_emulation.py calls these through ctypes): what it
// must run correctly, and the misuse it must turn into a launch error instead of a hang or a silent answer.
#include "cuda_emulation.h"

namespace {

__global__ void butterfly_sum(float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = static_cast<float>(i);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[i] = v;
}

// Block-wide sum through shared memory: warp partials, a barrier, then thread 0 adds them.
__global__ void shared_sum(const float* in, float* out) {
  __shared__ float partial[32];
  const int tid = threadIdx.x;
  float v = in[blockIdx.x * blockDim.x + tid];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (tid % 32 == 0) partial[tid / 32] = v;
  __syncthreads();
  if (tid == 0) {
    float s = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x) / 32; ++w) s += partial[w];
    out[blockIdx.x] = s;
  }
}

// Warp 0 waits at the block barrier while half of warp 1 waits at a warp barrier the other half never reaches.
__global__ void deadlock() {
  const int tid = threadIdx.x;
  if (tid >= 48) __syncwarp();
  __syncthreads();
}

// The upper half-warp exits, the lower half reads it.
__global__ void shuffle_from_exited_lane(float* out) {
  const int lane = threadIdx.x % 32;
  if (lane >= 16) return;
  out[lane] = __shfl_xor_sync(0xffffffffu, 1.f, 16);
}

// Exited threads do not hold a barrier back (sm_70+ semantics).
__global__ void barrier_after_exit(float* out) {
  if (threadIdx.x >= 40) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

}  // namespace

extern "C" {

int emu_butterfly_sum(float* out, int blocks, int threads) {
  ::pill_emu::launch_on_default_stream(blocks, threads, butterfly_sum)(out);
  return static_cast<int>(cudaGetLastError());
}

int emu_shared_sum(const float* in, float* out, int blocks, int threads) {
  ::pill_emu::launch_on_default_stream(blocks, threads, shared_sum)(in, out);
  return static_cast<int>(cudaGetLastError());
}

int emu_deadlock() {
  ::pill_emu::launch_on_default_stream(1, 64, deadlock)();
  return static_cast<int>(cudaGetLastError());
}

int emu_shuffle_from_exited_lane(float* out) {
  ::pill_emu::launch_on_default_stream(1, 32, shuffle_from_exited_lane)(out);
  return static_cast<int>(cudaGetLastError());
}

int emu_barrier_after_exit(float* out) {
  ::pill_emu::launch_on_default_stream(1, 64, barrier_after_exit)(out);
  return static_cast<int>(cudaGetLastError());
}

int emu_launch_failure_code() { return static_cast<int>(cudaErrorLaunchFailure); }

}  // extern "C"
