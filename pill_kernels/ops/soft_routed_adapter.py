"""soft_routed_adapter: LaVIN's soft-routed RepAdapter (shared down-projection, E up-projection experts mixed
per token), with an optional RMSNorm fused in front.

Reference: `pill_kernels.reference.soft_routed_adapter`; kernels: `triton/soft_routed_adapter.py`,
`csrc/soft_routed_adapter_cpu.cpp`, `csrc/soft_routed_adapter.cu`; tests: `tests/test_ops.py`; benchmark:
`benchmarks/test_bench_soft_routed_adapter.py`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch, reference
from ._common import (Tensor, call_features, empty_if_none, none_if_empty, reference_vjp, require_norm_weight,
                      require_same, require_shape, require_tensor)

OP = "soft_routed_adapter"


@torch.library.custom_op("pill_kernels::soft_routed_adapter", mutates_args=())
def soft_routed_adapter_op(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                           routing_weights: Tensor, dropout_mask: Optional[Tensor], norm_weight: Optional[Tensor],
                           eps: float, scale: float, backend: str) -> Tensor:
    return dispatch.kernel(OP, backend).forward(
        x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale)


@soft_routed_adapter_op.register_fake
def _(x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale, backend):
    return torch.empty_like(x)


@torch.library.custom_op("pill_kernels::soft_routed_adapter_backward", mutates_args=())
def soft_routed_adapter_backward_op(
        grad_y: Tensor, x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, routing_weights: Tensor,
        dropout_mask: Optional[Tensor], norm_weight: Optional[Tensor], eps: float, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = dispatch.kernel(OP, backend).backward(
        grad_y, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale)
    return (*grads[:6], empty_if_none(grads[6], x))


@soft_routed_adapter_backward_op.register_fake
def _(grad_y, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale, backend):
    return (torch.empty_like(x), torch.empty_like(w_down), torch.empty_like(b_down), torch.empty_like(w_up),
            torch.empty_like(b_up), torch.empty_like(routing_weights),
            torch.empty_like(norm_weight) if norm_weight is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale, backend = inputs
    ctx.save_for_backward(x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight)
    ctx.eps, ctx.scale, ctx.backend = eps, scale, backend


def _backward(ctx, grad_y):
    x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight = ctx.saved_tensors
    dx, dwd, dbd, dwu, dbu, dw, dnw = soft_routed_adapter_backward_op(
        grad_y.contiguous(), x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight,
        ctx.eps, ctx.scale, ctx.backend)
    return dx, dwd, dbd, dwu, dbu, dw, None, none_if_empty(dnw, norm_weight is not None), None, None, None


soft_routed_adapter_op.register_autograd(_backward, setup_context=_setup_context)


def _eager_forward(x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale):
    with torch.no_grad():
        return reference.soft_routed_adapter(x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask,
                                             norm_weight, eps, scale)


def _eager_backward(grad_y, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale):
    fn = lambda *a: reference.soft_routed_adapter(*a, eps, scale)  # noqa: E731
    grads = reference_vjp(fn, grad_y, (x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight),
                          (True, True, True, True, True, True, False, True))
    return (*grads[:6], grads[7])


dispatch.register(OP, "eager", _eager_forward, _eager_backward)


def soft_routed_adapter(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                        routing_weights: Tensor, *, dropout_mask: Optional[Tensor] = None,
                        norm_weight: Optional[Tensor] = None, eps: float = 1e-6, scale: float = 1.0,
                        backend: Optional[str] = None) -> Tensor:
    """LaVIN's soft-routed adapter: ``n + scale * sum_e w[t, e] * (z W_up[e] + b_up[e])``, ``z = (n W_down + b) * mask``.

    x [..., D]; w_down [D, r]; b_down [r]; w_up [E, r, D]; b_up [E, D]; routing_weights [..., E];
    dropout_mask [..., r] (already scaled by 1/(1-p)) or None. See `reference.soft_routed_adapter`.
    """
    require_tensor(OP, "x", x, floating=True)
    for name, t in (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up),
                    ("routing_weights", routing_weights)):
        require_tensor(OP, name, t, floating=True)
    hidden = x.shape[-1]
    if w_down.dim() != 2 or w_up.dim() != 3:
        raise ValueError(f"{OP}: w_down must be [D, r] and w_up [E, r, D], got {tuple(w_down.shape)} and "
                         f"{tuple(w_up.shape)}")
    rank, num_experts = w_down.shape[1], w_up.shape[0]
    lead = tuple(x.shape[:-1])
    require_shape(OP, "w_down", w_down, (hidden, rank), "[D, r]")
    require_shape(OP, "b_down", b_down, (rank,), "[r]")
    require_shape(OP, "w_up", w_up, (num_experts, rank, hidden), "[E, r, D]")
    require_shape(OP, "b_up", b_up, (num_experts, hidden), "[E, D]")
    require_shape(OP, "routing_weights", routing_weights, lead + (num_experts,), "[..., E]")
    require_same(OP, "x", x, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, routing_weights=routing_weights,
                 norm_weight=norm_weight, dropout_mask=dropout_mask)
    require_norm_weight(OP, norm_weight, hidden)
    if dropout_mask is not None:
        require_tensor(OP, "dropout_mask", dropout_mask, floating=True)
        require_shape(OP, "dropout_mask", dropout_mask, lead + (rank,), "[..., r]")
        dropout_mask = dropout_mask.reshape(-1, rank).contiguous()
    chosen = dispatch.resolve(OP, x.device, backend, call_features(
        x, w_down, b_down, w_up, b_up, routing_weights, norm_weight, dtype=str(x.dtype),
        tokens=x.numel() // max(hidden, 1), hidden=hidden, rank=rank))
    args = (x.reshape(-1, hidden).contiguous(), w_down.contiguous(), b_down.contiguous(), w_up.contiguous(),
            b_up.contiguous(), routing_weights.reshape(-1, num_experts).contiguous(), dropout_mask, norm_weight,
            float(eps), float(scale))
    # Eager runs the reference under autograd: its backward reuses the saved activations instead of recomputing.
    y = reference.soft_routed_adapter(*args) if chosen == "eager" else soft_routed_adapter_op(*args, chosen)
    return y.reshape(x.shape)
