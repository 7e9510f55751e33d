"""What `pip install` built: pill_kernels._C imports and every compiled op has a kernel for each device the
build claims. A CPU torch gives the C++ kernels; a CUDA torch with a toolkit (CUDA_HOME) gives CUDA kernels too,
built and registered without a GPU. PILL_KERNELS_EXPECT_CUDA_BUILD=1 (CI's CUDA-torch environment) turns the
skip of a build without CUDA into a failure."""
import os

import pytest
import torch

import pill_kernels

EXPECT_CUDA = os.environ.get("PILL_KERNELS_EXPECT_CUDA_BUILD") == "1"
COMPILED_OPS = [f"{op}_{direction}" for op in ("routed_glu_adapter", "soft_routed_adapter", "modality_gate")
                for direction in ("forward", "backward")]


def _built():
    try:
        from pill_kernels import _C  # noqa: F401
    except ImportError as exc:
        if EXPECT_CUDA:
            pytest.fail(f"pill_kernels._C does not import: {exc}")
        pytest.skip(f"the extension is not built: {exc}")
    return pill_kernels.extension_info()


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pill_kernels_C::{op}", key)


def test_every_compiled_op_has_a_cpu_kernel():
    _built()
    for op in COMPILED_OPS:
        assert _has_kernel(op, "CPU"), f"pill_kernels_C::{op} has no CPU kernel"


def test_a_cuda_build_registers_cuda_kernels_for_every_op():
    info = _built()
    if "CUDA kernels" not in info:
        if EXPECT_CUDA:
            pytest.fail(f"expected a CUDA build (PILL_KERNELS_EXPECT_CUDA_BUILD=1), got: {info}")
        pytest.skip(f"built without CUDA: {info}")
    assert f"CUDA {torch.version.cuda}" in info, info
    for op in COMPILED_OPS:
        assert _has_kernel(op, "CUDA"), f"pill_kernels_C::{op} has no CUDA kernel"
    # Without a GPU the backend says why it cannot run rather than failing at launch.
    if not torch.cuda.is_available():
        assert "cuda" not in pill_kernels.available_backends("routed_glu_adapter", "cpu")
