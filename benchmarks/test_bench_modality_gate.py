"""modality_gate (PILL MAG on image tokens' values): backends vs the reference."""
import pytest
import torch

import pill_kernels as pk
from pill_kernels import reference as ref

from bench_common import Case, cases, params, run, skip_unless_runnable

FULL_SHAPES = [
    Case("cpu-T4096-D1024-H8-hd128", "cpu", torch.float32, dict(tokens=4096, hidden=1024, heads=8, head_dim=128,
                                                                image_fraction=0.25)),
]
SMALL_SHAPES = [
    Case("cpu-T96-D136-H4-hd16", "cpu", torch.float32, dict(tokens=96, hidden=136, heads=4, head_dim=16,
                                                            image_fraction=0.25)),
]


@pytest.mark.parametrize("case,backend,which", params(cases(FULL_SHAPES, SMALL_SHAPES)))
def test_modality_gate(benchmark, case, backend, which):
    skip_unless_runnable("modality_gate", case, backend)
    s, dev, dt = case.shape, case.device, case.dtype
    x = torch.randn(s["tokens"], s["hidden"], device=dev, dtype=dt)
    w_gate = 0.05 * torch.randn(s["hidden"], s["heads"], device=dev, dtype=dt)
    v = torch.randn(s["tokens"], s["heads"], s["head_dim"], device=dev, dtype=dt)
    image_mask = torch.rand(s["tokens"], device=dev) < s["image_fraction"]
    params_ = [t.requires_grad_() for t in (x, w_gate, v)]
    if backend == "reference":
        forward = lambda: ref.modality_gate(x, w_gate, v, image_mask)  # noqa: E731
    else:
        forward = lambda: pk.modality_gate(x, w_gate, v, image_mask, backend=backend)  # noqa: E731
    run(benchmark, case, which, forward, params_, torch.randn_like(v))
