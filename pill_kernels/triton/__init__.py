"""The "triton" backend: one module per fused op, each with its @triton.jit forward and backward kernels and the
launch functions registered here with `dispatch`. Importing this package needs triton; pill_kernels imports it
only when triton is installed."""
from __future__ import annotations

import json
import os

import torch

from .. import dispatch
from . import gated_attention, modality_gate, routed_glu_adapter, soft_routed_adapter
from ._common import INTERPRET, auto_skip_reason, unavailable_reason

# Devices on which benchmarks/RESULTS.md measured the fused gated attention faster than the eager sdpa path
# ({"gated_attention": ["NVIDIA H100 80GB HBM3", ...]}); "auto" uses the kernel only there.
_MEASURED_WINS = os.path.join(os.path.dirname(__file__), "measured_wins.json")


def _measured_win_reason(op: str):
    with open(_MEASURED_WINS) as f:
        devices = json.load(f).get(op, [])

    def reason(device: torch.device) -> str | None:
        interpreted = auto_skip_reason(device)
        if interpreted is not None:
            return interpreted
        name = torch.cuda.get_device_name(device)
        if name not in devices:
            return (f"not measured faster than the eager path on {name} (benchmarks/RESULTS.md); ask for "
                    f"backend='triton' by name")
        return None

    return reason


for _op, _module in (("routed_glu_adapter", routed_glu_adapter), ("soft_routed_adapter", soft_routed_adapter),
                     ("modality_gate", modality_gate)):
    dispatch.register(_op, "triton", _module.forward, _module.backward, unavailable_reason=unavailable_reason,
                      auto_skip_reason=auto_skip_reason)
dispatch.register("gated_attention", "triton", gated_attention.forward, gated_attention.backward,
                  unavailable_reason=unavailable_reason, auto_skip_reason=_measured_win_reason("gated_attention"))

__all__ = ["INTERPRET"]
