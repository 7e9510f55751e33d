// The schemas of the compiled ops under the emulator's own namespace, so that the CUDA bindings built with
// -DPILL_CUDA_EMULATION (CPU kernels of pill_kernels_C_cuda_emulated) never touch the real pill_kernels_C.
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(pill_kernels_C_cuda_emulated, m) { pill_kernels::define_compiled_ops(m); }
