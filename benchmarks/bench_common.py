"""Shared by the kernel benchmark suites: the device/shape cases, the backends to time on each device, and the
timing call. Add a device or a shape by appending to CASES (GPU shapes go there too)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

import pill_kernels as pk

# Small shapes by default, so `python -m pytest benchmarks --benchmark-disable -q` is a smoke test of seconds;
# PILL_BENCH_FULL=1 for the shapes recorded in RESULTS.md.
FULL = os.environ.get("PILL_BENCH_FULL") == "1"
ROUNDS = int(os.environ.get("PILL_BENCH_ROUNDS", "30" if FULL else "3"))

# "reference" is pill_kernels.reference differentiated by autograd (what a user writes without this library);
# the others are pill_kernels backends through the public op.
BACKENDS_BY_DEVICE = {
    "cpu": ["reference", "eager", "cpp"],  # triton on CPU is the interpreter: a test tool, not a contender
    "cuda": ["reference", "eager", "triton", "cuda"],
}
PASSES = ["forward", "forward_backward"]


@dataclass(frozen=True)
class Case:
    name: str
    device: str
    dtype: torch.dtype
    shape: dict = field(default_factory=dict)

    def __str__(self):
        return self.name


def cases(full_shapes: list[Case], small_shapes: list[Case]) -> list[Case]:
    return full_shapes if FULL else small_shapes


def params(case_list: list[Case]):
    """(case, backend, pass) combinations of the suites, with readable ids."""
    out = []
    for case in case_list:
        for backend in BACKENDS_BY_DEVICE[case.device]:
            for which in PASSES:
                out.append(pytest.param(case, backend, which, id=f"{case.name}-{backend}-{which}"))
    return out


def skip_unless_runnable(op: str, case: Case, backend: str) -> None:
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend != "reference" and backend not in pk.available_backends(op, case.device):
        pytest.skip(f"backend {backend} is not available for {op} on {case.device}: {pk.extension_info()}")


def run(benchmark, case: Case, which: str, forward, params_: list[torch.Tensor], grad_out: torch.Tensor):
    """Times forward() alone (under no_grad) or forward() plus the gradients of params_."""
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)
    if which == "forward":
        def step():
            with torch.no_grad():
                forward()
            sync()
    else:
        def step():
            torch.autograd.grad(forward(), params_, grad_out)
            sync()
    benchmark.extra_info.update(device=case.device, dtype=str(case.dtype).replace("torch.", ""),
                                threads=torch.get_num_threads(), **case.shape)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2 if FULL else 1, iterations=1)
