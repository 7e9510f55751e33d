// Entry point of the compiled extension pill_kernels._C.
//
// Kernels register themselves as implementations of the `pill_kernels` custom ops (or under
// `pill_kernels_C`) from their own .cpp files; this file only creates the Python module so that
// `import pill_kernels._C` loads the library and runs those registrations, and records how it was built.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace {

std::string build_info() {
  std::string info = "pill_kernels._C built with C++ CPU kernels";
#ifdef PILL_KERNELS_WITH_CUDA
  info += " and CUDA kernels (CUDA " PILL_KERNELS_CUDA_VERSION ")";
#else
  info += " only (no CUDA)";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(pill_kernels_C, m) {
  m.def("build_info() -> str", &build_info);
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pill-kernels compiled ops", -1, nullptr};
  return PyModule_Create(&module);
}
