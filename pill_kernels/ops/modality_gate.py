"""modality_gate: PILL's modality attention gate (MAG), image tokens' values scaled by tanh(x W_g) per head.

Reference: `pill_kernels.reference.modality_gate`; kernels: `triton/modality_gate.py`,
`csrc/modality_gate_cpu.cpp`, `csrc/modality_gate.cu`; tests: `tests/test_ops.py`; benchmark:
`benchmarks/test_bench_modality_gate.py`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch, reference
from ._common import Tensor, call_features, reference_vjp, require_mask, require_same, require_tensor

OP = "modality_gate"


@torch.library.custom_op("pill_kernels::modality_gate", mutates_args=())
def modality_gate_op(x: Tensor, w_gate: Tensor, v: Tensor, image_mask: Tensor, backend: str) -> Tensor:
    return dispatch.kernel(OP, backend).forward(x, w_gate, v, image_mask)


@modality_gate_op.register_fake
def _(x, w_gate, v, image_mask, backend):
    return torch.empty_like(v)


@torch.library.custom_op("pill_kernels::modality_gate_backward", mutates_args=())
def modality_gate_backward_op(grad_v: Tensor, x: Tensor, w_gate: Tensor, v: Tensor, image_mask: Tensor,
                              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(dispatch.kernel(OP, backend).backward(grad_v, x, w_gate, v, image_mask))


@modality_gate_backward_op.register_fake
def _(grad_v, x, w_gate, v, image_mask, backend):
    return torch.empty_like(x), torch.empty_like(w_gate), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    x, w_gate, v, image_mask, backend = inputs
    ctx.save_for_backward(x, w_gate, v, image_mask)
    ctx.backend = backend


def _backward(ctx, grad_v):
    x, w_gate, v, image_mask = ctx.saved_tensors
    dx, dw, dv = modality_gate_backward_op(grad_v.contiguous(), x, w_gate, v, image_mask, ctx.backend)
    return dx, dw, dv, None, None


modality_gate_op.register_autograd(_backward, setup_context=_setup_context)


def _eager_forward(x, w_gate, v, image_mask):
    with torch.no_grad():
        return reference.modality_gate(x, w_gate, v, image_mask)


def _eager_backward(grad_v, x, w_gate, v, image_mask):
    dx, dw, dv, _ = reference_vjp(reference.modality_gate, grad_v, (x, w_gate, v, image_mask),
                                  (True, True, True, False))
    return dx, dw, dv


dispatch.register(OP, "eager", _eager_forward, _eager_backward)


def modality_gate(x: Tensor, w_gate: Tensor, v: Tensor, image_mask: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Scale image tokens' values by ``tanh(x W_gate)`` per token and head (PILL MAG).

    x [..., D] (the attention input); w_gate [D, Hg]; v [..., Hg, hd]; image_mask [...] bool, True for image
    tokens. See `reference.modality_gate`.
    """
    require_tensor(OP, "x", x, floating=True)
    require_tensor(OP, "w_gate", w_gate, floating=True)
    require_tensor(OP, "v", v, floating=True)
    hidden = x.shape[-1]
    lead = tuple(x.shape[:-1])
    if w_gate.dim() != 2 or w_gate.shape[0] != hidden:
        raise ValueError(f"{OP}: w_gate must have shape [D, Hg] with D={hidden}, got {tuple(w_gate.shape)}")
    heads = w_gate.shape[1]
    if v.dim() != len(lead) + 2 or tuple(v.shape[:-1]) != lead + (heads,):
        raise ValueError(f"{OP}: v must have shape [..., Hg, hd] = {lead + (heads, 'hd')}, got {tuple(v.shape)}")
    require_same(OP, "x", x, w_gate=w_gate, v=v)
    mask = require_mask(OP, "image_mask", image_mask, lead, "x.shape[:-1]", x.device)
    chosen = dispatch.resolve(OP, x.device, backend, call_features(
        x, w_gate, v, dtype=str(x.dtype), tokens=x.numel() // max(hidden, 1), hidden=hidden))
    args = (x.reshape(-1, hidden).contiguous(), w_gate.contiguous(), v.reshape(-1, heads, v.shape[-1]).contiguous(),
            mask.reshape(-1).contiguous())
    # Eager runs the reference under autograd: its backward reuses the saved activations instead of recomputing.
    out = reference.modality_gate(*args) if chosen == "eager" else modality_gate_op(*args, chosen)
    return out.reshape(v.shape)
