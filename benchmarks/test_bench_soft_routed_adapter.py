"""soft_routed_adapter (LaVIN MMA: shared down, two soft-mixed up experts, dropout mask, fused RMSNorm)."""
import pytest
import torch

import pill_kernels as pk
from pill_kernels import reference as ref

from bench_common import Case, cases, params, run, skip_unless_runnable

FULL_SHAPES = [
    Case("cpu-T4096-D1024-r32-E2", "cpu", torch.float32, dict(tokens=4096, hidden=1024, rank=32, experts=2)),
]
SMALL_SHAPES = [
    Case("cpu-T96-D136-r8-E2", "cpu", torch.float32, dict(tokens=96, hidden=136, rank=8, experts=2)),
]


@pytest.mark.parametrize("case,backend,which", params(cases(FULL_SHAPES, SMALL_SHAPES)))
def test_soft_routed_adapter(benchmark, case, backend, which):
    skip_unless_runnable("soft_routed_adapter", case, backend)
    s, dev, dt = case.shape, case.device, case.dtype
    T, D, r, E = s["tokens"], s["hidden"], s["rank"], s["experts"]
    x = torch.randn(T, D, device=dev, dtype=dt)
    w_down = 0.05 * torch.randn(D, r, device=dev, dtype=dt)
    b_down = 0.01 * torch.randn(r, device=dev, dtype=dt)
    w_up = 0.05 * torch.randn(E, r, D, device=dev, dtype=dt)
    b_up = 0.01 * torch.randn(E, D, device=dev, dtype=dt)
    routing = torch.softmax(torch.randn(T, E, device=dev, dtype=dt), -1)
    dropout_mask = (torch.rand(T, r, device=dev) > 0.1).to(dt) / 0.9
    norm_weight = 1 + 0.1 * torch.randn(D, device=dev, dtype=dt)
    params_ = [t.requires_grad_() for t in (x, w_down, b_down, w_up, b_up, routing, norm_weight)]
    if backend == "reference":
        forward = lambda: ref.soft_routed_adapter(x, w_down, b_down, w_up, b_up, routing, dropout_mask,  # noqa
                                                  norm_weight, 1e-6, 0.5)
    else:
        forward = lambda: pk.soft_routed_adapter(x, w_down, b_down, w_up, b_up, routing,  # noqa: E731
                                                 dropout_mask=dropout_mask, norm_weight=norm_weight, scale=0.5,
                                                 backend=backend)
    run(benchmark, case, which, forward, params_, torch.randn_like(x))
