"""routed_glu_adapter: PILL's hard-routed GLU adapter experts (MoMAE; one expert is the attention adapter), with
an optional RMSNorm fused in front.

Reference: `pill_kernels.reference.routed_glu_adapter`; kernels: `triton/routed_glu_adapter.py`,
`csrc/routed_glu_adapter_cpu.cpp`, `csrc/routed_glu_adapter*.cu`; tests: `tests/test_ops.py`; benchmark:
`benchmarks/test_bench_routed_glu_adapter.py`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch, reference
from ._common import (Tensor, call_features, checks_enabled, empty_if_none, none_if_empty, reference_vjp,
                      require_norm_weight, require_same, require_shape, require_tensor)

OP = "routed_glu_adapter"


@torch.library.custom_op("pill_kernels::routed_glu_adapter", mutates_args=())
def routed_glu_adapter_op(x: Tensor, w_down: Tensor, w_gate: Tensor, w_up: Tensor, expert_ids: Optional[Tensor],
                          norm_weight: Optional[Tensor], eps: float, backend: str,
                          save_uv: bool) -> tuple[Tensor, Tensor]:
    """(y, uv): uv holds the GLU's inputs [n W_down | n W_gate] per token ([T, 2r] in the accumulation dtype) when
    `save_uv` (only for a backend with the training pair, dispatch.Kernel.forward_saving), else it is empty and
    the backward recomputes them."""
    kernel = dispatch.kernel(OP, backend)
    if save_uv:
        return kernel.forward_saving(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps)
    return kernel.forward(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps), x.new_empty(0)


def _uv_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@routed_glu_adapter_op.register_fake
def _(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps, backend, save_uv):
    uv = x.new_empty((x.shape[0], 2 * w_down.shape[2]), dtype=_uv_dtype(x)) if save_uv else x.new_empty(0)
    return torch.empty_like(x), uv


@torch.library.custom_op("pill_kernels::routed_glu_adapter_backward", mutates_args=())
def routed_glu_adapter_backward_op(
        grad_y: Tensor, uv: Tensor, x: Tensor, w_down: Tensor, w_gate: Tensor, w_up: Tensor,
        expert_ids: Optional[Tensor], norm_weight: Optional[Tensor], eps: float,
        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernel = dispatch.kernel(OP, backend)
    if uv.numel() > 0:
        grads = kernel.backward_from_saved(grad_y, uv, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps)
    else:
        grads = kernel.backward(grad_y, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps)
    dx, dwd, dwg, dwu, dnw = grads
    return dx, dwd, dwg, dwu, empty_if_none(dnw, x)


@routed_glu_adapter_backward_op.register_fake
def _(grad_y, uv, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps, backend):
    return (torch.empty_like(x), torch.empty_like(w_down), torch.empty_like(w_gate), torch.empty_like(w_up),
            torch.empty_like(norm_weight) if norm_weight is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w_down, w_gate, w_up, expert_ids, norm_weight, eps, backend, _ = inputs
    uv = output[1]
    ctx.mark_non_differentiable(uv)
    ctx.save_for_backward(x, w_down, w_gate, w_up, expert_ids, norm_weight, uv)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad_y, _grad_uv):
    x, w_down, w_gate, w_up, expert_ids, norm_weight, uv = ctx.saved_tensors
    dx, dwd, dwg, dwu, dnw = routed_glu_adapter_backward_op(
        grad_y.contiguous(), uv, x, w_down, w_gate, w_up, expert_ids, norm_weight, ctx.eps, ctx.backend)
    return dx, dwd, dwg, dwu, None, none_if_empty(dnw, norm_weight is not None), None, None, None


routed_glu_adapter_op.register_autograd(_backward, setup_context=_setup_context)


def _eager_forward(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps):
    with torch.no_grad():
        return reference.routed_glu_adapter(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps)


def _eager_backward(grad_y, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps):
    fn = lambda *a: reference.routed_glu_adapter(*a, eps)  # noqa: E731
    dx, dwd, dwg, dwu, _, dnw = reference_vjp(
        fn, grad_y, (x, w_down, w_gate, w_up, expert_ids, norm_weight), (True, True, True, True, False, True))
    return dx, dwd, dwg, dwu, dnw


dispatch.register(OP, "eager", _eager_forward, _eager_backward)


def routed_glu_adapter(x: Tensor, w_down: Tensor, w_gate: Tensor, w_up: Tensor, expert_ids: Optional[Tensor] = None,
                       *, norm_weight: Optional[Tensor] = None, eps: float = 1e-6,
                       backend: Optional[str] = None) -> Tensor:
    """``n + A_{expert(t)}(n)`` per token, ``n = RMSNorm(x)`` if `norm_weight` is given else ``x``.

    x [..., D]; w_down, w_gate [E, D, r]; w_up [E, r, D]; expert_ids [...] integers in [0, E) (None allowed when
    E == 1). See `reference.routed_glu_adapter`.
    """
    require_tensor(OP, "x", x, floating=True)
    for name, w in (("w_down", w_down), ("w_gate", w_gate), ("w_up", w_up)):
        require_tensor(OP, name, w, floating=True)
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have shape [..., D], got a scalar")
    hidden = x.shape[-1]
    if w_down.dim() != 3:
        raise ValueError(f"{OP}: w_down must have shape [E, D, r], got {tuple(w_down.shape)}")
    num_experts, _, rank = w_down.shape
    require_shape(OP, "w_down", w_down, (num_experts, hidden, rank), "[E, D, r]")
    require_shape(OP, "w_gate", w_gate, (num_experts, hidden, rank), "[E, D, r]")
    require_shape(OP, "w_up", w_up, (num_experts, rank, hidden), "[E, r, D]")
    require_same(OP, "x", x, w_down=w_down, w_gate=w_gate, w_up=w_up, norm_weight=norm_weight)
    require_norm_weight(OP, norm_weight, hidden)
    lead = x.shape[:-1]
    if expert_ids is None:
        if num_experts != 1:
            raise ValueError(f"{OP}: expert_ids is required when there are E={num_experts} experts")
    else:
        require_tensor(OP, "expert_ids", expert_ids)
        if expert_ids.is_floating_point() or expert_ids.is_complex():
            raise TypeError(f"{OP}: expert_ids must be an integer or bool tensor, got {expert_ids.dtype}")
        require_shape(OP, "expert_ids", expert_ids, tuple(lead), "x.shape[:-1]")
        if expert_ids.device != x.device:
            raise ValueError(f"{OP}: expert_ids is on {expert_ids.device} but x is on {x.device}")
        expert_ids = expert_ids.reshape(-1).to(torch.int64)
        if checks_enabled() and expert_ids.numel() > 0:
            low, high = int(expert_ids.min()), int(expert_ids.max())
            if low < 0 or high >= num_experts:
                raise ValueError(f"{OP}: expert_ids must lie in [0, {num_experts}) for E={num_experts} experts, "
                                 f"got values in [{low}, {high}]")
    chosen = dispatch.resolve(OP, x.device, backend, call_features(
        x, w_down, w_gate, w_up, norm_weight, dtype=str(x.dtype), tokens=x.numel() // max(hidden, 1), hidden=hidden,
        rank=rank))
    args = (x.reshape(-1, hidden).contiguous(), w_down.contiguous(), w_gate.contiguous(), w_up.contiguous(),
            expert_ids, norm_weight, float(eps))
    # Eager runs the reference under autograd, whose backward reuses the activations autograd saved (the op's
    # eager backward recomputes the forward: measured 1.4-1.9x slower on CPU). But the reference gathers each
    # expert's tokens (data-dependent shapes, which torch.compile cannot trace in one graph): compiled code
    # calls the custom op, whose eager kernel runs the same reference opaquely.
    if chosen == "eager" and not torch.compiler.is_compiling():
        y = reference.routed_glu_adapter(*args)
    else:
        # Keeping u and v spares the backward a quarter of its products, for [T, 2r] floats of memory.
        save_uv = dispatch.kernel(OP, chosen).forward_saving is not None and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, w_down, w_gate, w_up, norm_weight))
        y, _ = routed_glu_adapter_op(*args, chosen, save_uv)
    return y.reshape(x.shape)
