"""The "triton" backend: one module per fused op, each with its @triton.jit forward and backward kernels and the
launch functions registered here with `dispatch`. Importing this package needs triton; pill_kernels imports it
only when triton is installed."""
from __future__ import annotations

from .. import dispatch
from . import gated_attention, modality_gate, routed_glu_adapter, soft_routed_adapter
from ._common import INTERPRET, auto_skip_reason, unavailable_reason

for _op, _module in (("routed_glu_adapter", routed_glu_adapter), ("soft_routed_adapter", soft_routed_adapter),
                     ("modality_gate", modality_gate)):
    dispatch.register(_op, "triton", _module.forward, _module.backward, unavailable_reason=unavailable_reason,
                      auto_skip_reason=auto_skip_reason)

# On a GPU, auto takes the attention kernel only at shapes where it measured faster than the sdpa path.
dispatch.register("gated_attention", "triton", gated_attention.forward, gated_attention.backward,
                  unavailable_reason=unavailable_reason, auto_skip_reason=auto_skip_reason,
                  auto_needs_measurement=True)

__all__ = ["INTERPRET"]
