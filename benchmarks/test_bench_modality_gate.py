"""Modality gate (PILL MAG on values): every backend against the eager reference, forward and forward+backward.

GPU shapes: bf16, D=4096, 32 heads of 128 (LLaMA-7B's values, gated per head), T in {2048, 8192, 32768},
image fraction in {6%, 25%, 50%}. CPU (PILL_BENCH_FULL=1): fp32, D=1024, 8 heads of 128, T=4096, 25% image.
"""
from __future__ import annotations

import pytest
import torch

import pill_kernels as pk
from pill_kernels import reference as ref

from conftest import DEVICE, FULL, ON_GPU, seed_everything, skip_unless_runs

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
HIDDEN, HEADS, HEAD_DIM = (4096, 32, 128) if ON_GPU else (1024, 8, 128) if FULL else (72, 3, 8)
TOKENS = [2048, 8192, 32768] if ON_GPU else [4096] if FULL else [37]
IMAGE_FRACTIONS = [0.06, 0.25, 0.5] if ON_GPU else [0.25]
BACKENDS = ["reference", "eager", "triton", "cuda", "cpp"]
RUN_IMAGE_TOKENS = 1024


@pytest.mark.parametrize("image_fraction", IMAGE_FRACTIONS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_modality_gate(benchmark, backend, pass_, tokens, image_fraction):
    skip_unless_runs("modality_gate", backend)
    seed_everything()
    backward = pass_ == "forward_backward"
    kw = dict(device=DEVICE, dtype=DTYPE)
    x = torch.randn(tokens, HIDDEN, **kw)
    w_gate = 0.02 * torch.randn(HIDDEN, HEADS, **kw)
    v = torch.randn(tokens, HEADS, HEAD_DIM, **kw)
    image = (torch.arange(tokens, device=DEVICE) % RUN_IMAGE_TOKENS) < round(image_fraction * RUN_IMAGE_TOKENS)
    leaves = [x, w_gate, v]
    for t in leaves:
        t.requires_grad_(backward)
    grad = torch.randn_like(v)

    def step():
        if backend == "reference":
            out = ref.modality_gate(x, w_gate, v, image)
        else:
            out = pk.modality_gate(x, w_gate, v, image, backend=backend)
        if backward:
            torch.autograd.backward(out, grad, inputs=leaves)
        return out

    step()
    benchmark.extra_info.update(op="modality_gate", backend=backend, pass_=pass_, tokens=tokens, hidden=HIDDEN,
                                heads=HEADS, head_dim=HEAD_DIM, image_fraction=image_fraction, dtype=str(DTYPE),
                                device=str(DEVICE))
    benchmark(step)
