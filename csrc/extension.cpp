// Entry point of the compiled extension pill_kernels._C.
//
// This file declares the schemas of the compiled ops (namespace `pill_kernels_C`) and creates the Python
// module so that `import pill_kernels._C` loads the library. Each op's kernels register themselves from their
// own files: TORCH_LIBRARY_IMPL(pill_kernels_C, CPU, m) in <op>_cpu.cpp, TORCH_LIBRARY_IMPL(pill_kernels_C,
// CUDA, m) in <op>_cuda.cpp (bindings, built only with CUDA) calling the launchers of <op>.cu.
//
// Semantics are those of pill_kernels/reference.py; arguments are the eager backend's in pill_kernels/ops.py,
// already validated and flattened by the Python layer: x [T, D] contiguous, expert_ids int64 [T],
// image_mask bool [T]. A backward returns an empty tensor for the gradient of an absent optional input.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu_gemm.h"
#include "op_schemas.h"

namespace {

std::string build_info() {
  std::string info = "pill_kernels._C built with C++ CPU kernels";
#ifdef PILL_KERNELS_WITH_CUDA
  info += " and CUDA kernels (CUDA " PILL_KERNELS_CUDA_VERSION ")";
#else
  info += " only (no CUDA)";
#endif
#ifdef _OPENMP
  info += "; C++ kernels parallel over torch's OpenMP threads";
#else
  info += "; C++ kernels single-threaded (built without OpenMP)";
#endif
  try {
    info += std::string("; CPU products on this CPU: ") + pill_kernels_cpu::selected_gemm_isa();
  } catch (const c10::Error& error) {  // PILL_KERNELS_CPU_ISA asks for more than the CPU has
    info += std::string("; ") + error.what_without_backtrace();
  }
  return info;
}

}  // namespace

TORCH_LIBRARY(pill_kernels_C, m) {
  m.def("build_info() -> str", &build_info);
  pill_kernels::define_compiled_ops(m);
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pill-kernels compiled ops", -1, nullptr};
  return PyModule_Create(&module);
}
