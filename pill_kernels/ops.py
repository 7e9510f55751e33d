"""The fused ops as `torch.library` custom ops (namespace ``pill_kernels``) and their public functional API.

Each op is a pair of custom ops, forward and backward, both with fake implementations so `torch.compile`
traces them as single nodes, tied together with `register_autograd`. The op bodies call whichever backend
`dispatch` resolved; the backend name travels as a string argument so a compiled graph keeps the choice.

The public functions (``routed_glu_adapter``, ``soft_routed_adapter``, ``modality_gate``,
``gated_attention``) validate their inputs with messages that name the argument, flatten leading dimensions
and resolve the backend before calling the op. When the backend is "eager" they run the eager formulation
itself under autograd instead of the op: its backward then reuses the activations autograd saved, where the
op's eager backward has to recompute the forward (measured on CPU: the op's eager forward+backward took
1.4-1.9x the reference's).
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch

from . import dispatch, reference

Tensor = torch.Tensor
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Eager backend of the custom ops (torch.ops.pill_kernels.* with backend "eager"): forward is the reference
# without autograd, backward the reference's vector-Jacobian product, recomputed (the forward saves only its
# inputs, as a fused kernel does). The public functions run the reference under autograd instead.
# ----------------------------------------------------------------------------------------------------------

def _reference_vjp(fn: Callable, grad_out: Tensor, args: Sequence, differentiable: Sequence[bool]) -> list:
    # torch.func.vjp rather than torch.autograd: op bodies run below the autograd dispatch key.
    wrt = [i for i, (a, d) in enumerate(zip(args, differentiable)) if d and a is not None]

    def fn_of_differentiable(*diff_args):
        full = list(args)
        for i, a in zip(wrt, diff_args):
            full[i] = a
        return fn(*full)

    _, vjp = torch.func.vjp(fn_of_differentiable, *[args[i] for i in wrt])
    grads = dict(zip(wrt, vjp(grad_out)))
    return [grads.get(i) for i in range(len(args))]


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _none_if_empty(t: Tensor, present: bool) -> Optional[Tensor]:
    return t if present else None


# ----------------------------------------------------------------------------------------------------------
# Op 1a: hard-routed GLU adapter experts (PILL MoMAE and attention adapter), optional fused RMSNorm.
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("pill_kernels::routed_glu_adapter", mutates_args=())
def _routed_glu_adapter_op(x: Tensor, w_down: Tensor, w_gate: Tensor, w_up: Tensor, expert_ids: Optional[Tensor],
                           norm_weight: Optional[Tensor], eps: float, backend: str) -> Tensor:
    return dispatch.kernel("routed_glu_adapter", backend).forward(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps)


@_routed_glu_adapter_op.register_fake
def _(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps, backend):
    return torch.empty_like(x)


@torch.library.custom_op("pill_kernels::routed_glu_adapter_backward", mutates_args=())
def _routed_glu_adapter_backward_op(
        grad_y: Tensor, x: Tensor, w_down: Tensor, w_gate: Tensor, w_up: Tensor, expert_ids: Optional[Tensor],
        norm_weight: Optional[Tensor], eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dwd, dwg, dwu, dnw = dispatch.kernel("routed_glu_adapter", backend).backward(
        grad_y, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps)
    return dx, dwd, dwg, dwu, _empty_if_none(dnw, x)


@_routed_glu_adapter_backward_op.register_fake
def _(grad_y, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps, backend):
    return (torch.empty_like(x), torch.empty_like(w_down), torch.empty_like(w_gate), torch.empty_like(w_up),
            torch.empty_like(norm_weight) if norm_weight is not None else x.new_empty(0))


def _routed_glu_setup(ctx, inputs, output):
    x, w_down, w_gate, w_up, expert_ids, norm_weight, eps, backend = inputs
    ctx.save_for_backward(x, w_down, w_gate, w_up, expert_ids, norm_weight)
    ctx.eps, ctx.backend = eps, backend


def _routed_glu_backward(ctx, grad_y):
    x, w_down, w_gate, w_up, expert_ids, norm_weight = ctx.saved_tensors
    dx, dwd, dwg, dwu, dnw = _routed_glu_adapter_backward_op(
        grad_y.contiguous(), x, w_down, w_gate, w_up, expert_ids, norm_weight, ctx.eps, ctx.backend)
    return dx, dwd, dwg, dwu, None, _none_if_empty(dnw, norm_weight is not None), None, None


_routed_glu_adapter_op.register_autograd(_routed_glu_backward, setup_context=_routed_glu_setup)


def _eager_routed_glu_forward(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps):
    with torch.no_grad():
        return reference.routed_glu_adapter(x, w_down, w_gate, w_up, expert_ids, norm_weight, eps)


def _eager_routed_glu_backward(grad_y, x, w_down, w_gate, w_up, expert_ids, norm_weight, eps):
    fn = lambda *a: reference.routed_glu_adapter(*a, eps)  # noqa: E731
    dx, dwd, dwg, dwu, _, dnw = _reference_vjp(
        fn, grad_y, (x, w_down, w_gate, w_up, expert_ids, norm_weight), (True, True, True, True, False, True))
    return dx, dwd, dwg, dwu, dnw


dispatch.register("routed_glu_adapter", "eager", _eager_routed_glu_forward, _eager_routed_glu_backward)


# ----------------------------------------------------------------------------------------------------------
# Op 1b: soft-routed adapter (LaVIN MMA), optional fused RMSNorm.
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("pill_kernels::soft_routed_adapter", mutates_args=())
def _soft_routed_adapter_op(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                            routing_weights: Tensor, dropout_mask: Optional[Tensor], norm_weight: Optional[Tensor],
                            eps: float, scale: float, backend: str) -> Tensor:
    return dispatch.kernel("soft_routed_adapter", backend).forward(
        x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale)


@_soft_routed_adapter_op.register_fake
def _(x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale, backend):
    return torch.empty_like(x)


@torch.library.custom_op("pill_kernels::soft_routed_adapter_backward", mutates_args=())
def _soft_routed_adapter_backward_op(
        grad_y: Tensor, x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, routing_weights: Tensor,
        dropout_mask: Optional[Tensor], norm_weight: Optional[Tensor], eps: float, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = dispatch.kernel("soft_routed_adapter", backend).backward(
        grad_y, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale)
    return (*grads[:6], _empty_if_none(grads[6], x))


@_soft_routed_adapter_backward_op.register_fake
def _(grad_y, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale, backend):
    return (torch.empty_like(x), torch.empty_like(w_down), torch.empty_like(b_down), torch.empty_like(w_up),
            torch.empty_like(b_up), torch.empty_like(routing_weights),
            torch.empty_like(norm_weight) if norm_weight is not None else x.new_empty(0))


def _soft_setup(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale, backend = inputs
    ctx.save_for_backward(x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight)
    ctx.eps, ctx.scale, ctx.backend = eps, scale, backend


def _soft_backward(ctx, grad_y):
    x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight = ctx.saved_tensors
    dx, dwd, dbd, dwu, dbu, dw, dnw = _soft_routed_adapter_backward_op(
        grad_y.contiguous(), x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight,
        ctx.eps, ctx.scale, ctx.backend)
    return dx, dwd, dbd, dwu, dbu, dw, None, _none_if_empty(dnw, norm_weight is not None), None, None, None


_soft_routed_adapter_op.register_autograd(_soft_backward, setup_context=_soft_setup)


def _eager_soft_forward(x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps, scale):
    with torch.no_grad():
        return reference.soft_routed_adapter(x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask,
                                             norm_weight, eps, scale)


def _eager_soft_backward(grad_y, x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight, eps,
                         scale):
    fn = lambda *a: reference.soft_routed_adapter(*a, eps, scale)  # noqa: E731
    grads = _reference_vjp(fn, grad_y, (x, w_down, b_down, w_up, b_up, routing_weights, dropout_mask, norm_weight),
                           (True, True, True, True, True, True, False, True))
    return (*grads[:6], grads[7])


dispatch.register("soft_routed_adapter", "eager", _eager_soft_forward, _eager_soft_backward)


# ----------------------------------------------------------------------------------------------------------
# Op 2: modality gate (PILL MAG) on values.
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("pill_kernels::modality_gate", mutates_args=())
def _modality_gate_op(x: Tensor, w_gate: Tensor, v: Tensor, image_mask: Tensor, backend: str) -> Tensor:
    return dispatch.kernel("modality_gate", backend).forward(x, w_gate, v, image_mask)


@_modality_gate_op.register_fake
def _(x, w_gate, v, image_mask, backend):
    return torch.empty_like(v)


@torch.library.custom_op("pill_kernels::modality_gate_backward", mutates_args=())
def _modality_gate_backward_op(grad_v: Tensor, x: Tensor, w_gate: Tensor, v: Tensor, image_mask: Tensor,
                               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(dispatch.kernel("modality_gate", backend).backward(grad_v, x, w_gate, v, image_mask))


@_modality_gate_backward_op.register_fake
def _(grad_v, x, w_gate, v, image_mask, backend):
    return torch.empty_like(x), torch.empty_like(w_gate), torch.empty_like(v)


def _gate_setup(ctx, inputs, output):
    x, w_gate, v, image_mask, backend = inputs
    ctx.save_for_backward(x, w_gate, v, image_mask)
    ctx.backend = backend


def _gate_backward(ctx, grad_v):
    x, w_gate, v, image_mask = ctx.saved_tensors
    dx, dw, dv = _modality_gate_backward_op(grad_v.contiguous(), x, w_gate, v, image_mask, ctx.backend)
    return dx, dw, dv, None, None


_modality_gate_op.register_autograd(_gate_backward, setup_context=_gate_setup)


def _eager_gate_forward(x, w_gate, v, image_mask):
    with torch.no_grad():
        return reference.modality_gate(x, w_gate, v, image_mask)


def _eager_gate_backward(grad_v, x, w_gate, v, image_mask):
    dx, dw, dv, _ = _reference_vjp(reference.modality_gate, grad_v, (x, w_gate, v, image_mask),
                                   (True, True, True, False))
    return dx, dw, dv


dispatch.register("modality_gate", "eager", _eager_gate_forward, _eager_gate_backward)


# ----------------------------------------------------------------------------------------------------------
# Op 3: gated attention (per-query-head value gate, LLaMA-Adapter V2 prompt branch).
# ----------------------------------------------------------------------------------------------------------

# The forward also returns the backend's softmax statistics (the Triton kernel's per-row log-sum-exp; empty for
# eager), saved with the output so that the backward needs no recomputation of the forward.
_SOFTMAX_STATS = {"triton": lambda q: q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))}


@torch.library.custom_op("pill_kernels::gated_attention", mutates_args=())
def _gated_attention_op(q: Tensor, k: Tensor, v: Tensor, gate_logits: Optional[Tensor], image_mask: Optional[Tensor],
                        key_padding_mask: Optional[Tensor], prompt_k: Optional[Tensor], prompt_v: Optional[Tensor],
                        prompt_gate: Optional[Tensor], causal: bool, scale: float,
                        backend: str) -> tuple[Tensor, Tensor]:
    out, stats = dispatch.kernel("gated_attention", backend).forward(
        q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate, causal, scale)
    return out, _empty_if_none(stats, q)


@_gated_attention_op.register_fake
def _(q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate, causal, scale, backend):
    return torch.empty_like(q), _SOFTMAX_STATS.get(backend, lambda q: q.new_empty(0))(q)


@torch.library.custom_op("pill_kernels::gated_attention_backward", mutates_args=())
def _gated_attention_backward_op(
        grad_o: Tensor, out: Tensor, stats: Tensor, q: Tensor, k: Tensor, v: Tensor, gate_logits: Optional[Tensor],
        image_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], prompt_k: Optional[Tensor],
        prompt_v: Optional[Tensor], prompt_gate: Optional[Tensor], causal: bool, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = dispatch.kernel("gated_attention", backend).backward(
        grad_o, out, stats, q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate,
        causal, scale)
    return tuple(_empty_if_none(g, q) for g in grads)


@_gated_attention_backward_op.register_fake
def _(grad_o, out, stats, q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate, causal,
      scale, backend):
    like = lambda t: torch.empty_like(t) if t is not None else q.new_empty(0)  # noqa: E731
    return like(q), like(k), like(v), like(gate_logits), like(prompt_k), like(prompt_v), like(prompt_gate)


def _attention_setup(ctx, inputs, output):
    *tensors, causal, scale, backend = inputs
    ctx.save_for_backward(*tensors, *output)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(output[1])


def _attention_backward(ctx, grad_o, _grad_stats):
    q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate, out, stats = \
        ctx.saved_tensors
    dq, dk, dv, dgate, dpk, dpv, dpg = _gated_attention_backward_op(
        grad_o.contiguous(), out, stats, q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v,
        prompt_gate, ctx.causal, ctx.scale, ctx.backend)
    return (dq, dk, dv, _none_if_empty(dgate, gate_logits is not None), None, None,
            _none_if_empty(dpk, prompt_k is not None), _none_if_empty(dpv, prompt_v is not None),
            _none_if_empty(dpg, prompt_gate is not None), None, None, None)


_gated_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def _sdpa_gated_attention(q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate,
                          causal, scale):
    """Eager gated attention through PyTorch's sdpa (no S x S matrix kept for autograd on fused sdpa backends)."""
    batch, heads, seq_q, _ = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if gate_logits is not None:
        gate = torch.tanh(gate_logits)
        v = v * torch.where(image_mask[:, None, :], gate, torch.ones_like(gate))[..., None]
    allowed = None
    if causal and seq_q > 1 or key_padding_mask is not None:
        allowed = torch.ones(batch, 1, seq_q, seq_k, dtype=torch.bool, device=q.device)
        if causal:
            rows = torch.arange(seq_q, device=q.device)[:, None] + (seq_k - seq_q)
            allowed = allowed & (torch.arange(seq_k, device=q.device)[None, :] <= rows)
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, :]
    if allowed is not None:
        # A padding query that sees no key would give NaN; let it see everything, then zero its output.
        has_key = allowed.any(dim=-1, keepdim=True)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, scale=scale)
        out = out * has_key
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    if prompt_k is not None:
        pk = prompt_k.repeat_interleave(group, dim=1)
        pv = prompt_v.repeat_interleave(group, dim=1)
        prompt_out = torch.nn.functional.scaled_dot_product_attention(q, pk, pv, scale=scale)
        out = out + torch.tanh(prompt_gate)[None, :, None, None] * prompt_out
    return out


def _eager_attention_forward(*args):
    with torch.no_grad():
        return _sdpa_gated_attention(*args), None


def _eager_attention_backward(grad_o, out, stats, q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k,
                              prompt_v, prompt_gate, causal, scale):
    fn = lambda *a: _sdpa_gated_attention(*a, causal, scale)  # noqa: E731
    grads = _reference_vjp(fn, grad_o, (q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v,
                                        prompt_gate), (True, True, True, True, False, False, True, True, True))
    dq, dk, dv, dgate, _, _, dpk, dpv, dpg = grads
    return dq, dk, dv, dgate, dpk, dpv, dpg


dispatch.register("gated_attention", "eager", _eager_attention_forward, _eager_attention_backward)


# ----------------------------------------------------------------------------------------------------------
# Input validation.
# ----------------------------------------------------------------------------------------------------------

def _checks_enabled() -> bool:
    # Range checks on routing ids read the tensor back to the host; PILL_KERNELS_CHECKS=0 skips them on GPU.
    return os.environ.get("PILL_KERNELS_CHECKS", "1") != "0" and not torch.compiler.is_compiling()


def _require_tensor(op: str, name: str, t, *, floating: bool = False) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def _require_shape(op: str, name: str, t: Tensor, expected: tuple, meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def _require_same(op: str, ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move them together")
        if t.is_floating_point() and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast the weights to the "
                            f"activation dtype (the pill modules do this)")


def _require_mask(op: str, name: str, mask: Tensor, expected: tuple, meaning: str, device) -> Tensor:
    _require_tensor(op, name, mask)
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"{op}: {name} must be a bool or integer 0/1 tensor, got {mask.dtype}")
    _require_shape(op, name, mask, expected, meaning)
    if mask.device != device:
        raise ValueError(f"{op}: {name} is on {mask.device} but the inputs are on {device}")
    return mask.to(torch.bool)


def _shape(*grad_inputs: Optional[Tensor], **sizes) -> dict:
    """The call's features for auto's measured choice (dispatch.SHAPE_FEATURES): which pass runs, and sizes."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)
    return {"pass": "forward_backward" if needs_grad else "forward", **sizes}


# ----------------------------------------------------------------------------------------------------------
# Public functional API.
# ----------------------------------------------------------------------------------------------------------

def routed_glu_adapter(x: Tensor, w_down: Tensor, w_gate: Tensor, w_up: Tensor, expert_ids: Optional[Tensor] = None,
                       *, norm_weight: Optional[Tensor] = None, eps: float = 1e-6,
                       backend: Optional[str] = None) -> Tensor:
    """``n + A_{expert(t)}(n)`` per token, ``n = RMSNorm(x)`` if `norm_weight` is given else ``x``.

    x [..., D]; w_down, w_gate [E, D, r]; w_up [E, r, D]; expert_ids [...] integers in [0, E) (None allowed when
    E == 1). See `reference.routed_glu_adapter`.
    """
    op = "routed_glu_adapter"
    _require_tensor(op, "x", x, floating=True)
    for name, w in (("w_down", w_down), ("w_gate", w_gate), ("w_up", w_up)):
        _require_tensor(op, name, w, floating=True)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape [..., D], got a scalar")
    hidden = x.shape[-1]
    if w_down.dim() != 3:
        raise ValueError(f"{op}: w_down must have shape [E, D, r], got {tuple(w_down.shape)}")
    num_experts, _, rank = w_down.shape
    _require_shape(op, "w_down", w_down, (num_experts, hidden, rank), "[E, D, r]")
    _require_shape(op, "w_gate", w_gate, (num_experts, hidden, rank), "[E, D, r]")
    _require_shape(op, "w_up", w_up, (num_experts, rank, hidden), "[E, r, D]")
    _require_same(op, "x", x, w_down=w_down, w_gate=w_gate, w_up=w_up, norm_weight=norm_weight)
    if norm_weight is not None:
        _require_shape(op, "norm_weight", _require_tensor(op, "norm_weight", norm_weight, floating=True),
                       (hidden,), "[D]")
    lead = x.shape[:-1]
    if expert_ids is None:
        if num_experts != 1:
            raise ValueError(f"{op}: expert_ids is required when there are E={num_experts} experts")
    else:
        _require_tensor(op, "expert_ids", expert_ids)
        if expert_ids.is_floating_point() or expert_ids.is_complex():
            raise TypeError(f"{op}: expert_ids must be an integer or bool tensor, got {expert_ids.dtype}")
        _require_shape(op, "expert_ids", expert_ids, tuple(lead), "x.shape[:-1]")
        if expert_ids.device != x.device:
            raise ValueError(f"{op}: expert_ids is on {expert_ids.device} but x is on {x.device}")
        expert_ids = expert_ids.reshape(-1).to(torch.int64)
        if _checks_enabled() and expert_ids.numel() > 0:
            low, high = int(expert_ids.min()), int(expert_ids.max())
            if low < 0 or high >= num_experts:
                raise ValueError(f"{op}: expert_ids must lie in [0, {num_experts}) for E={num_experts} experts, "
                                 f"got values in [{low}, {high}]")
    chosen = dispatch.resolve(op, x.device, backend, _shape(
        x, w_down, w_gate, w_up, norm_weight, dtype=str(x.dtype), tokens=x.numel() // max(hidden, 1), hidden=hidden,
        rank=rank))
    args = (x.reshape(-1, hidden).contiguous(), w_down.contiguous(), w_gate.contiguous(), w_up.contiguous(),
            expert_ids, norm_weight, float(eps))
    # The reference gathers each expert's tokens (data-dependent shapes, which torch.compile cannot trace in one
    # graph): compiled code calls the custom op, whose eager kernel runs the same reference opaquely.
    if chosen == "eager" and not torch.compiler.is_compiling():
        y = reference.routed_glu_adapter(*args)
    else:
        y = _routed_glu_adapter_op(*args, chosen)
    return y.reshape(x.shape)


def soft_routed_adapter(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                        routing_weights: Tensor, *, dropout_mask: Optional[Tensor] = None,
                        norm_weight: Optional[Tensor] = None, eps: float = 1e-6, scale: float = 1.0,
                        backend: Optional[str] = None) -> Tensor:
    """LaVIN's soft-routed adapter: ``n + scale * sum_e w[t, e] * (z W_up[e] + b_up[e])``, ``z = (n W_down + b) * mask``.

    x [..., D]; w_down [D, r]; b_down [r]; w_up [E, r, D]; b_up [E, D]; routing_weights [..., E];
    dropout_mask [..., r] (already scaled by 1/(1-p)) or None. See `reference.soft_routed_adapter`.
    """
    op = "soft_routed_adapter"
    _require_tensor(op, "x", x, floating=True)
    for name, t in (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up),
                    ("routing_weights", routing_weights)):
        _require_tensor(op, name, t, floating=True)
    hidden = x.shape[-1]
    if w_down.dim() != 2 or w_up.dim() != 3:
        raise ValueError(f"{op}: w_down must be [D, r] and w_up [E, r, D], got {tuple(w_down.shape)} and "
                         f"{tuple(w_up.shape)}")
    rank, num_experts = w_down.shape[1], w_up.shape[0]
    lead = tuple(x.shape[:-1])
    _require_shape(op, "w_down", w_down, (hidden, rank), "[D, r]")
    _require_shape(op, "b_down", b_down, (rank,), "[r]")
    _require_shape(op, "w_up", w_up, (num_experts, rank, hidden), "[E, r, D]")
    _require_shape(op, "b_up", b_up, (num_experts, hidden), "[E, D]")
    _require_shape(op, "routing_weights", routing_weights, lead + (num_experts,), "[..., E]")
    _require_same(op, "x", x, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, routing_weights=routing_weights,
                  norm_weight=norm_weight, dropout_mask=dropout_mask)
    if norm_weight is not None:
        _require_shape(op, "norm_weight", _require_tensor(op, "norm_weight", norm_weight, floating=True),
                       (hidden,), "[D]")
    if dropout_mask is not None:
        _require_tensor(op, "dropout_mask", dropout_mask, floating=True)
        _require_shape(op, "dropout_mask", dropout_mask, lead + (rank,), "[..., r]")
        dropout_mask = dropout_mask.reshape(-1, rank).contiguous()
    chosen = dispatch.resolve(op, x.device, backend, _shape(
        x, w_down, b_down, w_up, b_up, routing_weights, norm_weight, dtype=str(x.dtype),
        tokens=x.numel() // max(hidden, 1), hidden=hidden, rank=rank))
    args = (x.reshape(-1, hidden).contiguous(), w_down.contiguous(), b_down.contiguous(), w_up.contiguous(),
            b_up.contiguous(), routing_weights.reshape(-1, num_experts).contiguous(), dropout_mask, norm_weight,
            float(eps), float(scale))
    y = reference.soft_routed_adapter(*args) if chosen == "eager" else _soft_routed_adapter_op(*args, chosen)
    return y.reshape(x.shape)


def modality_gate(x: Tensor, w_gate: Tensor, v: Tensor, image_mask: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Scale image tokens' values by ``tanh(x W_gate)`` per token and head (PILL MAG).

    x [..., D] (the attention input); w_gate [D, Hg]; v [..., Hg, hd]; image_mask [...] bool, True for image
    tokens. See `reference.modality_gate`.
    """
    op = "modality_gate"
    _require_tensor(op, "x", x, floating=True)
    _require_tensor(op, "w_gate", w_gate, floating=True)
    _require_tensor(op, "v", v, floating=True)
    hidden = x.shape[-1]
    lead = tuple(x.shape[:-1])
    if w_gate.dim() != 2 or w_gate.shape[0] != hidden:
        raise ValueError(f"{op}: w_gate must have shape [D, Hg] with D={hidden}, got {tuple(w_gate.shape)}")
    heads = w_gate.shape[1]
    if v.dim() != len(lead) + 2 or tuple(v.shape[:-1]) != lead + (heads,):
        raise ValueError(f"{op}: v must have shape [..., Hg, hd] = {lead + (heads, 'hd')}, got {tuple(v.shape)}")
    _require_same(op, "x", x, w_gate=w_gate, v=v)
    mask = _require_mask(op, "image_mask", image_mask, lead, "x.shape[:-1]", x.device)
    chosen = dispatch.resolve(op, x.device, backend, _shape(
        x, w_gate, v, dtype=str(x.dtype), tokens=x.numel() // max(hidden, 1), hidden=hidden))
    args = (x.reshape(-1, hidden).contiguous(), w_gate.contiguous(), v.reshape(-1, heads, v.shape[-1]).contiguous(),
            mask.reshape(-1).contiguous())
    out = reference.modality_gate(*args) if chosen == "eager" else _modality_gate_op(*args, chosen)
    return out.reshape(v.shape)


def gated_attention(q: Tensor, k: Tensor, v: Tensor, *, gate_logits: Optional[Tensor] = None,
                    image_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                    prompt_k: Optional[Tensor] = None, prompt_v: Optional[Tensor] = None,
                    prompt_gate: Optional[Tensor] = None, causal: bool = True, scale: Optional[float] = None,
                    backend: Optional[str] = None) -> Tensor:
    """Causal attention with PILL's per-query-head value gate and LLaMA-Adapter V2's prompt branch.

    q [B, H, S, hd]; k, v [B, Hkv, Skv, hd]; gate_logits [B, H, Skv] with image_mask [B, Skv];
    key_padding_mask [B, Skv] (True = real key); prompt_k, prompt_v [B, Hkv, K, hd] with prompt_gate [H].
    See `reference.gated_attention`.
    """
    op = "gated_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require_tensor(op, name, t, floating=True)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must have shape [B, heads, S, hd], got {tuple(t.shape)}")
    batch, heads, _, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{op}: the number of query heads ({heads}) must be a multiple of the key/value heads "
                         f"({kv_heads})")
    _require_shape(op, "k", k, (batch, kv_heads, seq_k, head_dim), "[B, Hkv, Skv, hd]")
    _require_shape(op, "v", v, (batch, kv_heads, seq_k, head_dim), "[B, Hkv, Skv, hd]")
    _require_same(op, "q", q, k=k, v=v, gate_logits=gate_logits, prompt_k=prompt_k, prompt_v=prompt_v,
                  prompt_gate=prompt_gate)
    if (gate_logits is None) != (image_mask is None):
        raise ValueError(f"{op}: gate_logits and image_mask go together; pass both or neither")
    if gate_logits is not None:
        _require_shape(op, "gate_logits", _require_tensor(op, "gate_logits", gate_logits, floating=True),
                       (batch, heads, seq_k), "[B, H, Skv]")
        image_mask = _require_mask(op, "image_mask", image_mask, (batch, seq_k), "[B, Skv]", q.device)
    if key_padding_mask is not None:
        key_padding_mask = _require_mask(op, "key_padding_mask", key_padding_mask, (batch, seq_k), "[B, Skv]",
                                         q.device)
    if not (prompt_k is None) == (prompt_v is None) == (prompt_gate is None):
        raise ValueError(f"{op}: prompt_k, prompt_v and prompt_gate go together; pass all three or none")
    if prompt_k is not None:
        num_prompts = prompt_k.shape[2] if prompt_k.dim() == 4 else -1
        _require_shape(op, "prompt_k", prompt_k, (batch, kv_heads, num_prompts, head_dim), "[B, Hkv, K, hd]")
        _require_shape(op, "prompt_v", prompt_v, (batch, kv_heads, num_prompts, head_dim), "[B, Hkv, K, hd]")
        _require_shape(op, "prompt_gate", prompt_gate, (heads,), "[H]")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    variant = "+".join(name for name, present in (("gate", gate_logits is not None),
                                                    ("prompt", prompt_k is not None)) if present) or "plain"
    chosen = dispatch.resolve(op, q.device, backend, _shape(
        q, k, v, gate_logits, prompt_k, prompt_v, prompt_gate, dtype=str(q.dtype), variant=variant, batch=batch,
        seq=q.shape[2], heads=heads, head_dim=head_dim))
    contiguous = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    args = (q.contiguous(), k.contiguous(), v.contiguous(), contiguous(gate_logits), contiguous(image_mask),
            contiguous(key_padding_mask), contiguous(prompt_k), contiguous(prompt_v), contiguous(prompt_gate),
            bool(causal), scale)
    if chosen == "eager":
        return _sdpa_gated_attention(*args)
    out, _ = _gated_attention_op(*args, chosen)
    return out
