"""Soft-routed adapter (LaVIN's RepAdapter router with its fused RMSNorm and skip, training mode with a dropout
mask): every backend against the eager reference, forward and forward+backward.

GPU shapes: bf16, D=4096, r=32, E=2, T in {2048, 8192, 32768}. CPU (PILL_BENCH_FULL=1): fp32, D=1024, T=4096.
"""
from __future__ import annotations

import pytest
import torch

import pill_kernels as pk
from pill_kernels import reference as ref

from conftest import DEVICE, FULL, ON_GPU, seed_everything, skip_unless_runs

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
HIDDEN, RANK, EXPERTS = (4096, 32, 2) if ON_GPU else (1024, 32, 2) if FULL else (72, 8, 2)
TOKENS = [2048, 8192, 32768] if ON_GPU else [4096] if FULL else [37]
BACKENDS = ["reference", "eager", "triton", "cuda", "cpp"]


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_routed_adapter(benchmark, backend, pass_, tokens):
    skip_unless_runs("soft_routed_adapter", backend)
    seed_everything()
    backward = pass_ == "forward_backward"
    kw = dict(device=DEVICE, dtype=DTYPE)
    x = torch.randn(tokens, HIDDEN, **kw)
    params = dict(w_down=0.02 * torch.randn(HIDDEN, RANK, **kw), b_down=0.02 * torch.randn(RANK, **kw),
                  w_up=0.02 * torch.randn(EXPERTS, RANK, HIDDEN, **kw), b_up=0.02 * torch.randn(EXPERTS, HIDDEN, **kw),
                  routing_weights=torch.softmax(torch.randn(tokens, EXPERTS, **kw), -1),
                  norm_weight=1 + 0.1 * torch.randn(HIDDEN, **kw))
    dropout_mask = (torch.rand(tokens, RANK, **kw) > 0.1).to(DTYPE) / 0.9
    leaves = [x, *params.values()]
    for t in leaves:
        t.requires_grad_(backward)
    grad_y = torch.randn_like(x)

    def step():
        if backend == "reference":
            y = ref.soft_routed_adapter(x, **params, dropout_mask=dropout_mask, eps=1e-6, scale=1.0)
        else:
            y = pk.soft_routed_adapter(x, **params, dropout_mask=dropout_mask, scale=1.0, backend=backend)
        if backward:
            torch.autograd.backward(y, grad_y, inputs=leaves)
        return y

    step()
    benchmark.extra_info.update(op="soft_routed_adapter", backend=backend, pass_=pass_, tokens=tokens, hidden=HIDDEN,
                                rank=RANK, experts=EXPERTS, dtype=str(DTYPE), device=str(DEVICE),
                                floor_bytes=(4 if backward else 2) * x.numel() * x.element_size())
    benchmark(step)
