"""Plain-PyTorch ground truth for every fused op (docs/design.md, "Op semantics"), and the "eager" backend.

These functions are the specification: benchmarks use them as the eager baseline and the "eager" backend runs
them (tests check every backend, eager included, against definitions written independently in
tests/op_testing.py). They are written for clarity first; each differentiates through autograd.
Gated attention has two formulations: `gated_attention` with the explicit S x S score matrix, and
`gated_attention_sdpa`, the same through PyTorch's scaled_dot_product_attention, which the eager backend runs
(fused sdpa kernels keep no S x S matrix for autograd).

Shapes: T tokens (B*S flattened), D hidden, r bottleneck, E experts, H query heads, Hkv key/value heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "glu_adapter",
    "routed_glu_adapter",
    "soft_routed_adapter",
    "modality_gate",
    "gated_attention",
    "gated_attention_sdpa",
]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are normalised in fp32 as Hugging Face's LlamaRMSNorm does; fp64 stays fp64 so that
    # the float64 ground truth is not rounded through fp32.
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA RMSNorm with the rounding order of transformers' LlamaRMSNorm: normalise in fp32, cast, scale."""
    xf = x.to(_accumulation_dtype(x.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype)


def glu_adapter(n: torch.Tensor, w_down: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """PILL's GLU adapter without its skip: ``W_up(SiLU(n W_gate) * (n W_down))``; w_down/w_gate [D, r], w_up [r, D]."""
    return (F.silu(n @ w_gate) * (n @ w_down)) @ w_up


def routed_glu_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    expert_ids: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Hard-routed GLU adapter experts with their input skip (PILL MoMAE; E=1 is PILL's attention adapter).

    ``y[t] = n[t] + A_{e(t)}(n[t])`` with ``n = RMSNorm(x; norm_weight, eps)`` when ``norm_weight`` is given,
    else ``n = x``. x [T, D]; w_down, w_gate [E, D, r]; w_up [E, r, D]; expert_ids [T] integers in [0, E)
    (may be None when E == 1). Each token goes through its own expert only.
    """
    n = rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    num_experts = w_down.shape[0]
    if num_experts == 1:
        return n + glu_adapter(n, w_down[0], w_gate[0], w_up[0])
    delta = torch.zeros_like(n)
    for e in range(num_experts):
        idx = (expert_ids == e).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        # .to: under autocast the matmuls return the autocast dtype while delta keeps n's.
        update = glu_adapter(n.index_select(0, idx), w_down[e], w_gate[e], w_up[e]).to(delta.dtype)
        delta = delta.index_add(0, idx, update)
    return n + delta


def soft_routed_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    routing_weights: torch.Tensor,
    dropout_mask: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale: float = 1.0,
) -> torch.Tensor:
    """LaVIN's RepAdapter router: a shared down-projection and E soft-mixed up-projections, plus the input skip.

    ``z = (n W_down + b_down) * dropout_mask``;
    ``y = n + scale * sum_e routing_weights[t, e] * (z W_up[e] + b_up[e])``.
    x [T, D]; w_down [D, r]; b_down [r]; w_up [E, r, D] (LaVIN's grouped 1x1 convolutions are block-diagonal
    dense matrices here); b_up [E, D]; routing_weights [T, E]; dropout_mask [T, r] already scaled by 1/(1-p),
    or None outside training.
    """
    n = rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    z = n @ w_down + b_down
    if dropout_mask is not None:
        z = z * dropout_mask
    experts = torch.einsum("tr,erd->ted", z, w_up) + b_up  # [T, E, D]
    mixed = torch.einsum("te,ted->td", routing_weights, experts)
    return n + scale * mixed


def modality_gate(x: torch.Tensor, w_gate: torch.Tensor, v: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """PILL's modality attention gate (MAG) on values.

    ``gate = tanh(x W_gate)`` [T, Hg]; ``v[t, h, :] *= gate[t, h]`` for image tokens (image_mask[t] True);
    text tokens pass through. x [T, D]; w_gate [D, Hg]; v [T, Hg, hd]; image_mask [T] bool.
    """
    gate = torch.tanh(x @ w_gate)
    multiplier = torch.where(image_mask[:, None], gate, torch.ones_like(gate))
    return v * multiplier[..., None]


def _expand_heads_and_gate_values(q, k, v, gate_logits, image_mask):
    """k and v repeated to the query heads (GQA), and the values of image keys scaled by tanh(gate_logits)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if gate_logits is not None:
        gate = torch.tanh(gate_logits)
        v = v * torch.where(image_mask[:, None, :], gate, torch.ones_like(gate))[..., None]
    return k, v


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] True at the first position of each segment: consecutive positions with the same id form one
    segment (a packed example, or a row's trailing padding), so ids may repeat in other runs without joining
    them."""
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return change


def segment_runs(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] the segment number of each position (`segment_starts`)."""
    return segment_starts(segment_ids).long().cumsum(-1)


def _allowed_keys(batch, seq_q, seq_k, causal, key_padding_mask, device, segment_ids=None, window=None):
    """[B, 1, S, Skv] True where a query may attend to a key: causal (query i at key position Skv - S + i), within
    the last `window` positions up to the query's own when there is a window, real keys only, and keys of the
    query's own segment."""
    allowed = torch.ones(batch, 1, seq_q, seq_k, dtype=torch.bool, device=device)
    if causal:
        rows = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
        columns = torch.arange(seq_k, device=device)[None, :]
        allowed = allowed & (columns <= rows)
        if window:
            allowed = allowed & (columns > rows - window)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    if segment_ids is not None:
        runs = segment_runs(segment_ids)
        allowed = allowed & (runs[:, seq_k - seq_q:, None] == runs[:, None, :])[:, None]
    return allowed


def _allowed_prompts(seq_q, segment_ids, prompt_segment_ids):
    """[B, 1, S, K] True where a query may attend to a prompt: the prompt's segment id is the query's (packed rows
    hold one example's prompts per segment); None without segments (every prompt)."""
    if prompt_segment_ids is None:
        return None
    query_ids = segment_ids[:, segment_ids.shape[1] - seq_q:]
    return (query_ids[:, :, None] == prompt_segment_ids[:, None, :])[:, None]


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate_logits: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    prompt_k: torch.Tensor | None = None,
    prompt_v: torch.Tensor | None = None,
    prompt_gate: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    segment_ids: torch.Tensor | None = None,
    prompt_segment_ids: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Causal softmax attention with PILL's per-query-head value gate and LLaMA-Adapter V2's prompt branch.

    q [B, H, S, hd]; k, v [B, Hkv, Skv, hd] (Hkv divides H; the last S keys are the queries' own positions, so
    query i sits at key position Skv - S + i). gate_logits [B, H, Skv]: for image keys (image_mask [B, Skv])
    the value seen by query head h is scaled by tanh(gate_logits[b, h, j]). key_padding_mask [B, Skv]: True
    for real keys. Prompt branch: ``+ tanh(prompt_gate[h]) * softmax(q prompt_k^T * scale) prompt_v`` with
    prompt_k, prompt_v [B, Hkv, K, hd] (no causal mask, its own softmax). A query that may attend to no key
    (a padding row) outputs zeros from the token branch.

    Packed rows: segment_ids [B, Skv] (integers): a query sees only keys of its own segment, a maximal run of
    equal ids; prompt_segment_ids [B, K]: a query sees only the prompts whose id equals its segment's id (none:
    zeros from the prompt branch).

    Sliding window (``window``, with ``causal``): query i sees only the keys at positions Skv - S + i - window + 1
    .. Skv - S + i, its own included, as transformers' sliding-window layers (Mistral, Qwen2 / Qwen3's
    "sliding_attention"); the prompt branch is not windowed. Returns [B, H, S, hd].
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    group = heads // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    k, v = _expand_heads_and_gate_values(q, k, v, gate_logits, image_mask)
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = _allowed_keys(batch, seq_q, seq_k, causal, key_padding_mask, q.device, segment_ids, window)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * allowed.any(dim=-1, keepdim=True)
    out = probs @ v
    if prompt_k is not None:
        pk = prompt_k.repeat_interleave(group, dim=1)
        pv = prompt_v.repeat_interleave(group, dim=1)
        prompt_scores = (q @ pk.transpose(-1, -2)) * scale
        visible = _allowed_prompts(seq_q, segment_ids, prompt_segment_ids)
        if visible is not None:
            prompt_scores = prompt_scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        prompt_probs = torch.softmax(prompt_scores, dim=-1)
        if visible is not None:
            prompt_probs = prompt_probs * visible.any(dim=-1, keepdim=True)
        out = out + torch.tanh(prompt_gate)[None, :, None, None] * (prompt_probs @ pv)
    return out


def gated_attention_sdpa(q, k, v, gate_logits=None, image_mask=None, key_padding_mask=None, prompt_k=None,
                         prompt_v=None, prompt_gate=None, causal: bool = True, scale: float | None = None,
                         segment_ids=None, prompt_segment_ids=None, window=None):
    """`gated_attention` through ``F.scaled_dot_product_attention``: the gate applied to the values, the masks
    as one boolean mask, the prompt branch as a second sdpa call. Same arguments and result."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    group = heads // k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    k, v = _expand_heads_and_gate_values(q, k, v, gate_logits, image_mask)
    allowed = None
    windowed = causal and window and seq_k > window
    if causal and seq_q > 1 or windowed or key_padding_mask is not None or segment_ids is not None:
        allowed = _allowed_keys(batch, seq_q, seq_k, causal, key_padding_mask, q.device, segment_ids, window)
    out = _masked_sdpa(q, k, v, allowed, scale)
    if prompt_k is not None:
        pk = prompt_k.repeat_interleave(group, dim=1)
        pv = prompt_v.repeat_interleave(group, dim=1)
        prompt_out = _masked_sdpa(q, pk, pv, _allowed_prompts(seq_q, segment_ids, prompt_segment_ids), scale)
        out = out + torch.tanh(prompt_gate)[None, :, None, None] * prompt_out
    return out


def _masked_sdpa(q, k, v, allowed, scale):
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    # A query that sees no key would give NaN; let it see everything, then zero its output.
    has_key = allowed.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, scale=scale) * has_key
