"""Every Triton kernel compiles to a cubin for sm_80 and sm_90 (tests/triton_gpu_compile.py), without a GPU.

The interpreter-based tests check what the kernels compute; this checks that the GPU compiler accepts them
(dot shapes, dtypes, control flow, register allocation by ptxas), which the interpreter never does."""
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "triton_gpu_compile.py")


def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    # One process per architecture, side by side: LLVM and ptxas are single-threaded.
    runs = [subprocess.Popen([sys.executable, SCRIPT, arch], env=env, cwd=repo, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for arch in ("80", "90")]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output[-6000:]
        assert "0 failures" in output, output[-6000:]
