"""routed_glu_adapter (PILL MoMAE: two hard-routed GLU experts, fused RMSNorm): backends vs the reference."""
import pytest
import torch

import pill_kernels as pk
from pill_kernels import reference as ref

from bench_common import Case, cases, params, run, skip_unless_runnable

FULL_SHAPES = [
    Case("cpu-T4096-D1024-r32-E2", "cpu", torch.float32, dict(tokens=4096, hidden=1024, rank=32, experts=2,
                                                              image_fraction=0.25)),
]
SMALL_SHAPES = [
    Case("cpu-T96-D136-r8-E2", "cpu", torch.float32, dict(tokens=96, hidden=136, rank=8, experts=2,
                                                          image_fraction=0.25)),
]


@pytest.mark.parametrize("case,backend,which", params(cases(FULL_SHAPES, SMALL_SHAPES)))
def test_routed_glu_adapter(benchmark, case, backend, which):
    skip_unless_runnable("routed_glu_adapter", case, backend)
    s, dev, dt = case.shape, case.device, case.dtype
    x = torch.randn(s["tokens"], s["hidden"], device=dev, dtype=dt)
    w_down = 0.05 * torch.randn(s["experts"], s["hidden"], s["rank"], device=dev, dtype=dt)
    w_gate = 0.05 * torch.randn(s["experts"], s["hidden"], s["rank"], device=dev, dtype=dt)
    w_up = 0.05 * torch.randn(s["experts"], s["rank"], s["hidden"], device=dev, dtype=dt)
    norm_weight = 1 + 0.1 * torch.randn(s["hidden"], device=dev, dtype=dt)
    expert_ids = (torch.rand(s["tokens"], device=dev) < s["image_fraction"]).long()
    params_ = [t.requires_grad_() for t in (x, w_down, w_gate, w_up, norm_weight)]
    if backend == "reference":
        forward = lambda: ref.routed_glu_adapter(x, w_down, w_gate, w_up, expert_ids, norm_weight, 1e-6)  # noqa
    else:
        forward = lambda: pk.routed_glu_adapter(x, w_down, w_gate, w_up, expert_ids,  # noqa: E731
                                                norm_weight=norm_weight, backend=backend)
    run(benchmark, case, which, forward, params_, torch.randn_like(x))
