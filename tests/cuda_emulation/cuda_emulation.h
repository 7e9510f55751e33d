// A CPU emulator for the CUDA C++ that csrc/*.cu uses, so the tests run the hand-written CUDA kernels (and
// their torch bindings) on machines without a GPU. Built by tests/cuda_emulation.py with -DPILL_CUDA_EMULATION;
// csrc/cuda_utils.cuh and csrc/cuda_binding_utils.h include this header instead of the CUDA runtime then.
//
// Model: a launch runs its blocks one after another; a block's threads are cooperative fibers (ucontext) on the
// calling OS thread, switched only at __syncthreads, __syncwarp, warp shuffles and wmma calls; one warp runs
// as far as it can before the next (see run_block). Hence
// - `__shared__` variables are function statics (one OS thread runs one block at a time), and the dynamic
//   shared memory is one buffer per launch;
// - barriers count live threads only (as on sm_70+, exited threads do not hold a barrier back);
// - misuse CUDA leaves undefined becomes a launch error (cudaErrorLaunchFailure, with a message on stderr):
//   a barrier that can never complete (threads of a block waiting at different barriers), a shuffle with an
//   exited or masked-off lane, a partial-warp mask, more dynamic shared memory than the launch asked for.
// - a missing barrier between a shared-memory write and another thread's read usually shows up: lanes run
//   one at a time between warp barriers and warps one at a time between block barriers, in both orders.
// What it cannot show: races finer than that schedule, the memory model of global memory across blocks,
// timing, and the GPU's own rounding of intrinsics (expf, rsqrtf are the correctly rounded libm ones here).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

// Host compilation of the CUDA headers already maps __global__/__device__/__host__ to nothing.
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace pill_emu {

struct Fiber {
  ucontext_t context;
  uint3 thread_idx;
  bool done = false;
};

struct Barrier {
  int live = 0, arrived = 0;
  unsigned long generation = 0;
};

struct Warp {
  Barrier barrier;
  unsigned long long slot[32];
};

struct Launch {
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<Warp> warps;
  Barrier block_barrier;
  ucontext_t scheduler;
  int current = 0;
  bool failed = false;
  std::vector<unsigned char> dynamic_smem;
  void (*entry_body)(Launch*) = nullptr;
  void* kernel_call = nullptr;  // a KernelCall<...>*
};

inline Launch*& active() {
  static Launch* launch = nullptr;
  return launch;
}
inline cudaError_t& sticky_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}

inline Fiber& fiber() { return active()->fibers[active()->current]; }
inline int linear_tid() {
  const Launch& l = *active();
  const uint3 t = l.fibers[l.current].thread_idx;
  return static_cast<int>(t.x + l.block.x * (t.y + l.block.y * t.z));
}
inline int lane_id() { return linear_tid() % 32; }
inline Warp& my_warp() { return active()->warps[linear_tid() / 32]; }

inline void fail(const char* what) {
  Launch& l = *active();
  if (!l.failed) {
    std::fprintf(stderr, "pill_emu: %s (block %u,%u,%u thread %d)\n", what, l.block_idx.x, l.block_idx.y,
                 l.block_idx.z, linear_tid());
  }
  l.failed = true;
}

inline void yield() {
  Launch& l = *active();
  swapcontext(&l.fibers[l.current].context, &l.scheduler);
  if (l.failed) {
    // The launch was abandoned: park this fiber for good (the scheduler never resumes it).
    swapcontext(&l.fibers[l.current].context, &l.scheduler);
  }
}

inline void wait_at(Barrier& b) {
  const unsigned long generation = b.generation;
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation && !active()->failed) yield();
}

inline void leave(Barrier& b) {
  --b.live;
  if (b.arrived > 0 && b.arrived == b.live) {
    b.arrived = 0;
    ++b.generation;
  }
}

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(active()->dynamic_smem.data());
}

template <typename... P>
struct KernelCall {
  void (*kernel)(P...);
  std::tuple<std::decay_t<P>...> args;
  static void run(Launch* l) {
    auto* call = static_cast<KernelCall*>(l->kernel_call);
    std::apply(call->kernel, call->args);
  }
};

inline void fiber_entry() {
  Launch& l = *active();
  l.entry_body(&l);
  Fiber& f = l.fibers[l.current];
  f.done = true;
  leave(l.block_barrier);
  leave(my_warp().barrier);
  swapcontext(&f.context, &l.scheduler);
}

// Runs one block to completion; false when its threads deadlock at barriers.
inline bool run_block(Launch& l) {
  const int threads = static_cast<int>(l.block.x * l.block.y * l.block.z);
  constexpr size_t kStack = 256 * 1024;
  if (l.stacks.size() < static_cast<size_t>(threads)) {
    l.stacks.resize(threads);
    for (auto& s : l.stacks)
      if (!s) s.reset(new char[kStack]);
  }
  l.fibers.assign(threads, Fiber{});
  l.warps.assign((threads + 31) / 32, Warp{});
  l.block_barrier = Barrier{threads, 0, 0};
  for (int i = 0; i < threads; ++i) {
    l.warps[i / 32].barrier.live++;
    Fiber& f = l.fibers[i];
    f.thread_idx = uint3{static_cast<unsigned>(i % l.block.x), static_cast<unsigned>((i / l.block.x) % l.block.y),
                         static_cast<unsigned>(i / (l.block.x * l.block.y))};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = l.stacks[i].get();
    f.context.uc_stack.ss_size = kStack;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  // Warps run one at a time, each as far as it can go (to a block barrier, or its end) before the next starts,
  // in ascending order in even blocks and descending order in odd ones: a warp that reads shared memory
  // another warp writes without a __syncthreads in between then reads it too early or too late.
  const int warps = static_cast<int>(l.warps.size());
  const bool descending = (l.block_idx.x + l.block_idx.y + l.block_idx.z) % 2 == 1;
  auto progress = [&l]() {
    unsigned long p = l.block_barrier.generation;
    for (const Warp& w : l.warps) p += w.barrier.generation;
    for (const Fiber& f : l.fibers) p += f.done;
    return p;
  };
  for (;;) {
    const unsigned long pass_before = progress();
    bool alive = false;
    for (int k = 0; k < warps; ++k) {
      const int w = descending ? warps - 1 - k : k;
      for (;;) {
        const unsigned long round_before = progress();
        for (int i = 32 * w; i < threads && i < 32 * (w + 1); ++i) {
          if (l.fibers[i].done) continue;
          l.current = i;
          swapcontext(&l.scheduler, &l.fibers[i].context);
          if (l.failed) return false;
        }
        if (progress() == round_before) break;  // the warp waits on other warps (or is done)
      }
      for (int i = 32 * w; i < threads && i < 32 * (w + 1); ++i) alive |= !l.fibers[i].done;
    }
    if (!alive) return true;
    if (progress() == pass_before) {
      // A full pass in which every live thread only re-checked its barrier: nothing can change any more.
      l.current = 0;
      while (l.fibers[l.current].done) ++l.current;
      fail("deadlock: the block's live threads wait at barriers that can never complete");
      return false;
    }
  }
}

template <typename... P>
struct Launcher {
  dim3 grid, block;
  size_t smem;
  void (*kernel)(P...);

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    KernelCall<P...> call{kernel, std::tuple<std::decay_t<P>...>(static_cast<std::decay_t<P>>(args)...)};
    Launch l;
    l.grid = grid;
    l.block = block;
    l.dynamic_smem.assign(smem + 16, 0xff);  // NaN-ish bytes: reading unwritten shared memory shows
    l.entry_body = &KernelCall<P...>::run;
    l.kernel_call = &call;
    if (block.x * block.y * block.z == 0 || block.x * block.y * block.z > 1024 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
      std::fprintf(stderr, "pill_emu: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)\n", grid.x,
                   grid.y, grid.z, block.x, block.y, block.z);
      sticky_error() = cudaErrorInvalidConfiguration;
      return;
    }
    Launch* outer = active();
    active() = &l;
    for (unsigned z = 0; z < grid.z && !l.failed; ++z)
      for (unsigned y = 0; y < grid.y && !l.failed; ++y)
        for (unsigned x = 0; x < grid.x && !l.failed; ++x) {
          l.block_idx = uint3{x, y, z};
          run_block(l);
        }
    active() = outer;
    if (l.failed) sticky_error() = cudaErrorLaunchFailure;
  }
};

template <typename... P>
Launcher<P...> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...)) {
  return Launcher<P...>{grid, block, smem, kernel};
}

template <typename... P>
Launcher<P...> launch_on_default_stream(dim3 grid, dim3 block, void (*kernel)(P...)) {
  return Launcher<P...>{grid, block, 0, kernel};
}

inline cudaError_t get_last_error() {
  const cudaError_t e = sticky_error();
  sticky_error() = cudaSuccess;
  return e;
}

inline const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated; see stderr)";
    default: return "error (emulated)";
  }
}

}  // namespace pill_emu

// The built-in variables (read-only here, as in CUDA).
#define threadIdx (static_cast<const uint3>(::pill_emu::fiber().thread_idx))
#define blockIdx (static_cast<const uint3>(::pill_emu::active()->block_idx))
#define blockDim (static_cast<const dim3>(::pill_emu::active()->block))
#define gridDim (static_cast<const dim3>(::pill_emu::active()->grid))

inline void __syncthreads() { ::pill_emu::wait_at(::pill_emu::active()->block_barrier); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::pill_emu::fail("__syncwarp with a partial mask is not emulated");
  ::pill_emu::wait_at(::pill_emu::my_warp().barrier);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a type wider than 8 bytes");
  using namespace ::pill_emu;
  if (mask != 0xffffffffu || width != 32) fail("__shfl_xor_sync with a partial mask or width is not emulated");
  Warp& w = my_warp();
  const int lane = lane_id(), src = lane ^ (lane_mask & 31);
  std::memcpy(&w.slot[lane], &value, sizeof(T));
  wait_at(w.barrier);
  const int src_tid = (linear_tid() / 32) * 32 + src;
  if (src_tid >= static_cast<int>(active()->fibers.size()) || active()->fibers[src_tid].done)
    fail("__shfl_xor_sync reads a lane that has exited");
  T out;
  std::memcpy(&out, &w.slot[src], sizeof(T));
  wait_at(w.barrier);
  return out;
}

// nvcuda::wmma (the tensor-core fragments) for the 16x16x16 shapes: every lane holds the whole tile, loads and
// mma_sync compute it in fp32 in k order (the hardware's order is unspecified), and store_matrix_sync writes
// each element from one lane only (element i from lane i % 32). Because fibers interleave only at barriers, a
// lane that reads stored elements before a barrier reads stale memory, as the hardware would: a missing
// __syncwarp/__syncthreads after a store shows up as a wrong answer. Every call is a warp barrier (the
// operations need the whole warp converged) and checks the pointer and stride rules of the CUDA docs.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements the m16n16k16 shape only");
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  T tile[rows * cols];
};

namespace detail {
inline void enter(const void* p, unsigned ldm, size_t elem_bytes) {
  __syncwarp();
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) ::pill_emu::fail("wmma: pointer not 256-bit aligned");
  if ((ldm * elem_bytes) % 16 != 0) ::pill_emu::fail("wmma: ldm not a multiple of 16 bytes");
}
template <typename T>
inline float as_float(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  detail::enter(p, ldm, sizeof(T));
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.tile[i * 16 + j] = row ? p[i * ldm + j] : p[j * ldm + i];
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::enter(p, ldm, sizeof(float));
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.tile[i * 16 + j] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::enter(p, ldm, sizeof(float));
  const int lane = ::pill_emu::lane_id();
  for (int e = lane; e < 256; e += 32) {
    const int i = e / 16, j = e % 16;
    (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.tile[e];
  }
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, T v) {
  __syncwarp();
  for (auto& x : f.tile) x = v;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  __syncwarp();
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.tile[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += detail::as_float(a.tile[i * 16 + k]) * detail::as_float(b.tile[k * 16 + j]);
      out[i * 16 + j] = s;
    }
  std::memcpy(d.tile, out, sizeof out);
}

}  // namespace wmma
}  // namespace nvcuda

inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}

// Runtime API calls the launchers make; the emulated device is an H100-sized one (132 SMs).
#define cudaGetLastError() ::pill_emu::get_last_error()
#define cudaGetErrorString(e) ::pill_emu::error_string(e)
#define cudaGetDevice(d) (*(d) = 0, cudaSuccess)
#define cudaDeviceGetAttribute(v, attr, dev) (*(v) = 132, cudaSuccess)
