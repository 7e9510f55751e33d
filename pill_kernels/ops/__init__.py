"""The fused ops, one module per op: its input checks, `torch.library` custom op (namespace ``pill_kernels``)
with fake implementation and autograd, its eager backend and its public function.

Each op is a pair of custom ops, forward and backward, both with fake implementations so that
`torch.compile` traces them as single nodes, tied together with `register_autograd`. The op bodies call
whichever backend `dispatch` resolved; the backend name travels as a string argument so that a compiled graph
keeps the choice. The public functions validate their inputs with messages that name the argument, flatten
leading dimensions and resolve the backend before calling the op.
"""
from .gated_attention import gated_attention
from .modality_gate import modality_gate
from .routed_glu_adapter import routed_glu_adapter
from .soft_routed_adapter import soft_routed_adapter

__all__ = ["gated_attention", "modality_gate", "routed_glu_adapter", "soft_routed_adapter"]
