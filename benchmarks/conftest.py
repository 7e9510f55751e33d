"""Shared setup of the benchmark suites.

On a GPU the suites run the shapes of the kernel issues (LLaMA-7B widths, bf16). Without one they run tiny
shapes once, as a smoke test that every benchmark still works (CI: `pytest benchmarks --benchmark-disable`);
PILL_BENCH_FULL=1 asks for the full shapes on CPU too.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

ON_GPU = torch.cuda.is_available()
FULL = ON_GPU or os.environ.get("PILL_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

if not ON_GPU:
    # Triton kernels run through the interpreter without a GPU; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def synchronized_perf_counter() -> float:
    """A clock that first waits for queued GPU work, so a timed round covers the kernels it launched."""
    torch.cuda.synchronize()
    return time.perf_counter()


@pytest.fixture(autouse=True)
def _gpu_timer(benchmark):
    if ON_GPU:
        # pytest-benchmark times rounds of several calls between two timer reads; syncing in the timer keeps
        # asynchronous launches inside the round without a sync per call. (_timer: pytest-benchmark's clock.)
        benchmark._timer = synchronized_perf_counter
    yield


def seed_everything(seed: int = 0) -> None:
    torch.manual_seed(seed)


def skip_unless_runs(op: str, backend: str) -> None:
    """Skip a backend that cannot run `op` here, and the Triton interpreter unless it is a smoke run."""
    import pill_kernels as pk

    if backend in ("reference",):
        return
    if backend not in pk.available_backends(op, DEVICE):
        pytest.skip(f"{backend} cannot run {op} on {DEVICE}")
    if backend == "triton" and DEVICE.type == "cpu" and FULL:
        pytest.skip("the Triton interpreter is not a benchmark")
