"""gated_attention: causal attention with PILL's per-query-head value gate on image keys and LLaMA-Adapter V2's
gated prompt branch, in one call.

Reference: `pill_kernels.reference.gated_attention` (explicit) and `reference.gated_attention_sdpa` (what the
eager backend runs); kernels: `triton/gated_attention.py` (no C++ or CUDA kernel: sdpa is the eager path);
tests: `tests/test_ops.py`, `tests/test_triton_kernels.py`; benchmark: `benchmarks/test_bench_gated_attention.py`.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch, reference
from ._common import (Tensor, call_features, contiguous_or_none, empty_if_none, none_if_empty, reference_vjp,
                      require_mask, require_same, require_shape, require_tensor)

OP = "gated_attention"

# The forward also returns the backend's softmax statistics (the Triton kernel's per-row log-sum-exp; empty for
# eager), saved with the output so that the backward needs no recomputation of the forward.
_SOFTMAX_STATS = {"triton": lambda q: q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))}


@torch.library.custom_op("pill_kernels::gated_attention", mutates_args=())
def gated_attention_op(q: Tensor, k: Tensor, v: Tensor, gate_logits: Optional[Tensor], image_mask: Optional[Tensor],
                       key_padding_mask: Optional[Tensor], prompt_k: Optional[Tensor], prompt_v: Optional[Tensor],
                       prompt_gate: Optional[Tensor], segment_ids: Optional[Tensor],
                       prompt_segment_ids: Optional[Tensor], causal: bool, scale: float, window: int,
                       backend: str) -> tuple[Tensor, Tensor]:
    out, stats = dispatch.kernel(OP, backend).forward(
        q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate, segment_ids,
        prompt_segment_ids, causal, scale, window)
    return out, empty_if_none(stats, q)


@gated_attention_op.register_fake
def _(q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate, segment_ids,
      prompt_segment_ids, causal, scale, window, backend):
    return torch.empty_like(q), _SOFTMAX_STATS.get(backend, lambda q: q.new_empty(0))(q)


@torch.library.custom_op("pill_kernels::gated_attention_backward", mutates_args=())
def gated_attention_backward_op(
        grad_o: Tensor, out: Tensor, stats: Tensor, q: Tensor, k: Tensor, v: Tensor, gate_logits: Optional[Tensor],
        image_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], prompt_k: Optional[Tensor],
        prompt_v: Optional[Tensor], prompt_gate: Optional[Tensor], segment_ids: Optional[Tensor],
        prompt_segment_ids: Optional[Tensor], causal: bool, scale: float, window: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = dispatch.kernel(OP, backend).backward(
        grad_o, out, stats, q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate,
        segment_ids, prompt_segment_ids, causal, scale, window)
    return tuple(empty_if_none(g, q) for g in grads)


@gated_attention_backward_op.register_fake
def _(grad_o, out, stats, q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate,
      segment_ids, prompt_segment_ids, causal, scale, window, backend):
    like = lambda t: torch.empty_like(t) if t is not None else q.new_empty(0)  # noqa: E731
    return like(q), like(k), like(v), like(gate_logits), like(prompt_k), like(prompt_v), like(prompt_gate)


def _setup_context(ctx, inputs, output):
    *tensors, causal, scale, window, backend = inputs
    ctx.save_for_backward(*tensors, *output)
    ctx.causal, ctx.scale, ctx.window, ctx.backend = causal, scale, window, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_o, _grad_stats):
    (q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate, segment_ids,
     prompt_segment_ids, out, stats) = ctx.saved_tensors
    dq, dk, dv, dgate, dpk, dpv, dpg = gated_attention_backward_op(
        grad_o.contiguous(), out, stats, q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v,
        prompt_gate, segment_ids, prompt_segment_ids, ctx.causal, ctx.scale, ctx.window, ctx.backend)
    return (dq, dk, dv, none_if_empty(dgate, gate_logits is not None), None, None,
            none_if_empty(dpk, prompt_k is not None), none_if_empty(dpv, prompt_v is not None),
            none_if_empty(dpg, prompt_gate is not None), None, None, None, None, None, None)


gated_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _eager_forward(q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate, segment_ids,
                   prompt_segment_ids, causal, scale, window):
    with torch.no_grad():
        return reference.gated_attention_sdpa(q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v,
                                              prompt_gate, causal, scale, segment_ids, prompt_segment_ids,
                                              window), None


def _eager_backward(grad_o, out, stats, q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v,
                    prompt_gate, segment_ids, prompt_segment_ids, causal, scale, window):
    fn = lambda *a: reference.gated_attention_sdpa(*a, causal, scale, segment_ids,  # noqa: E731
                                                   prompt_segment_ids, window)
    grads = reference_vjp(fn, grad_o, (q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v,
                                       prompt_gate), (True, True, True, True, False, False, True, True, True))
    dq, dk, dv, dgate, _, _, dpk, dpv, dpg = grads
    return dq, dk, dv, dgate, dpk, dpv, dpg


dispatch.register(OP, "eager", _eager_forward, _eager_backward)


def gated_attention(q: Tensor, k: Tensor, v: Tensor, *, gate_logits: Optional[Tensor] = None,
                    image_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                    prompt_k: Optional[Tensor] = None, prompt_v: Optional[Tensor] = None,
                    prompt_gate: Optional[Tensor] = None, causal: bool = True, scale: Optional[float] = None,
                    segment_ids: Optional[Tensor] = None, prompt_segment_ids: Optional[Tensor] = None,
                    window: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    """Causal attention with PILL's per-query-head value gate and LLaMA-Adapter V2's prompt branch.

    q [B, H, S, hd]; k, v [B, Hkv, Skv, hd]; gate_logits [B, H, Skv] with image_mask [B, Skv];
    key_padding_mask [B, Skv] (True = real key); prompt_k, prompt_v [B, Hkv, K, hd] with prompt_gate [H].
    Packed rows (several examples per row, for training): segment_ids [B, Skv] integers, a query attending only
    to the keys of its own run of equal ids, and prompt_segment_ids [B, K], a query seeing only the prompts of its
    segment's id. window (with causal): a sliding window, query i seeing only the ``window`` key positions up
    to its own (transformers' sliding-window layers); None: every earlier key. See `reference.gated_attention`.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(OP, name, t, floating=True)
        if t.dim() != 4:
            raise ValueError(f"{OP}: {name} must have shape [B, heads, S, hd], got {tuple(t.shape)}")
    batch, heads, _, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{OP}: the number of query heads ({heads}) must be a multiple of the key/value heads "
                         f"({kv_heads})")
    require_shape(OP, "k", k, (batch, kv_heads, seq_k, head_dim), "[B, Hkv, Skv, hd]")
    require_shape(OP, "v", v, (batch, kv_heads, seq_k, head_dim), "[B, Hkv, Skv, hd]")
    require_same(OP, "q", q, k=k, v=v, gate_logits=gate_logits, prompt_k=prompt_k, prompt_v=prompt_v,
                  prompt_gate=prompt_gate)
    if (gate_logits is None) != (image_mask is None):
        raise ValueError(f"{OP}: gate_logits and image_mask go together; pass both or neither")
    if gate_logits is not None:
        require_shape(OP, "gate_logits", require_tensor(OP, "gate_logits", gate_logits, floating=True),
                       (batch, heads, seq_k), "[B, H, Skv]")
        image_mask = require_mask(OP, "image_mask", image_mask, (batch, seq_k), "[B, Skv]", q.device)
    if key_padding_mask is not None:
        key_padding_mask = require_mask(OP, "key_padding_mask", key_padding_mask, (batch, seq_k), "[B, Skv]",
                                         q.device)
    if not (prompt_k is None) == (prompt_v is None) == (prompt_gate is None):
        raise ValueError(f"{OP}: prompt_k, prompt_v and prompt_gate go together; pass all three or none")
    if prompt_k is not None:
        num_prompts = prompt_k.shape[2] if prompt_k.dim() == 4 else -1
        require_shape(OP, "prompt_k", prompt_k, (batch, kv_heads, num_prompts, head_dim), "[B, Hkv, K, hd]")
        require_shape(OP, "prompt_v", prompt_v, (batch, kv_heads, num_prompts, head_dim), "[B, Hkv, K, hd]")
        require_shape(OP, "prompt_gate", prompt_gate, (heads,), "[H]")
    if segment_ids is not None:
        segment_ids = _require_ids("segment_ids", segment_ids, (batch, seq_k), "[B, Skv]", q.device)
    if prompt_segment_ids is not None:
        if prompt_k is None or segment_ids is None:
            raise ValueError(f"{OP}: prompt_segment_ids needs prompt_k (the prompts it assigns) and segment_ids "
                             f"(the queries' segments)")
        prompt_segment_ids = _require_ids("prompt_segment_ids", prompt_segment_ids, (batch, prompt_k.shape[2]),
                                          "[B, K]", q.device)
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"{OP}: window must be None or a positive number of key positions, got {window!r}")
        if not causal:
            raise ValueError(f"{OP}: a sliding window is causal (the last `window` positions up to the query's); "
                             f"pass causal=True with window={window}")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    variant = "+".join(name for name, present in (("gate", gate_logits is not None),
                                                    ("prompt", prompt_k is not None),
                                                    ("packed", segment_ids is not None),
                                                    ("window", window is not None)) if present) or "plain"
    chosen = dispatch.resolve(OP, q.device, backend, call_features(
        q, k, v, gate_logits, prompt_k, prompt_v, prompt_gate, dtype=str(q.dtype), variant=variant, batch=batch,
        seq=q.shape[2], heads=heads, head_dim=head_dim))
    c = contiguous_or_none
    args = (q.contiguous(), k.contiguous(), v.contiguous(), c(gate_logits), c(image_mask), c(key_padding_mask),
            c(prompt_k), c(prompt_v), c(prompt_gate), c(segment_ids), c(prompt_segment_ids), bool(causal), scale,
            window or 0)
    # Eager runs the reference under autograd: its backward reuses the saved activations instead of recomputing.
    if chosen == "eager":
        (q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v, prompt_gate, segment_ids,
         prompt_segment_ids, causal, scale, window) = args
        return reference.gated_attention_sdpa(q, k, v, gate_logits, image_mask, key_padding_mask, prompt_k, prompt_v,
                                              prompt_gate, causal, scale, segment_ids, prompt_segment_ids, window)
    out, _ = gated_attention_op(*args, chosen)
    return out


def _require_ids(name: str, ids: Tensor, expected: tuple, meaning: str, device) -> Tensor:
    require_tensor(OP, name, ids)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{OP}: {name} must be an integer tensor (one id per packed example), got {ids.dtype}")
    require_shape(OP, name, ids, expected, meaning)
    if ids.device != device:
        raise ValueError(f"{OP}: {name} is on {ids.device} but the inputs are on {device}")
    return ids.to(torch.int32)
