"""Straightforward re-implementations of the three seed methods' forward passes (docs/methods.md),
written the way the seed code computes them, reading the weights of an injected model.

They share nothing with `pill` but the weights: eager attention with an S x S score matrix, both PILL experts
on every token selected with `where`, the MAG mask expanded to the value width, LaVIN's modality token as a
real position 0 that no other token may attend to, LaVIN's grouped 1x1 convolutions through `conv1d`, and
LLaMA-Adapter V2's prompt branch with its own softmax.

The block is the one the base's modules have, told from the modules themselves (not from `pill.families`):
projections with whatever biases they carry, and where the attention has ``q_norm`` / ``k_norm`` (Qwen3) a
per-head RMSNorm of the projected queries and keys before RoPE (and of LLaMA-Adapter V2's prompt keys).
Sliding windows as transformers' configs define them (`_layer_window`): a query at sequence index i sees keys
i - window < j <= i; LLaMA-Adapter V2's prompts are outside the sequence and not windowed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def _rms(norm, x):
    """RMSNorm at the input's precision (transformers' module rounds through fp32 even for fp64 inputs)."""
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _rms_fp32(norm, x):
    """RMSNorm over the last dimension in transformers' rounding order (normalised in fp32, then cast back and
    scaled), which the frozen per-head q/k norms of the base keep: written out here so that fp64 results agree
    to fp64 precision, not to fp32's."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _head_norm(attn, name, t):
    """t [B, S, heads, hd] through the attention's per-head norm `name` (q_norm / k_norm) if it has one."""
    norm = getattr(attn, name, None)
    return t if norm is None else _rms_fp32(norm, t)


def _linear(module, x, delta=None):
    """x W^T + b (+ a tuned bias held beside the pretrained one)."""
    out = x @ module.weight.t()
    if module.bias is not None:
        out = out + module.bias
    return out if delta is None else out + delta


def _glu(x, expert):
    return (F.silu(x @ expert.w_gate.to(x.dtype)) * (x @ expert.w_down.to(x.dtype))) @ expert.w_up.to(x.dtype)


def _layer_window(config, index):
    """The sliding window of layer `index` as the transformers config defines it: Mistral's sliding_window on
    every layer; Qwen2's / Qwen3's on the layers layer_types marks "sliding_attention"; None: full attention."""
    if config.model_type == "mistral":
        return config.sliding_window
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[index] == "sliding_attention":
        return config.sliding_window
    return None


def _attention(q, k, v, attention_mask_2d, extra_block=None, window=None):
    """Eager causal attention: q [B,H,S,hd], k/v [B,Hkv,S,hd] (repeated to H here), additive masks; a window
    blocks keys `window` or more positions before the query."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1) if v.shape[1] != heads else v
    seq = q.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    blocked = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    if window is not None:
        blocked = blocked | torch.tril(torch.ones(seq, seq, dtype=torch.bool), diagonal=-window)[None, None]
    if attention_mask_2d is not None:
        blocked = blocked | ~attention_mask_2d.bool()[:, None, None, :]
    if extra_block is not None:
        blocked = blocked | extra_block
    scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * (~blocked).any(-1, keepdim=True)
    return probs @ v


def _embed(model, input_ids, image_features):
    mm = model.multimodal
    placeholders = input_ids == mm.image_token_id
    embeds = model.model.embed_tokens(input_ids.masked_fill(placeholders, 0))
    if image_features is not None:
        img = mm.projector(image_features.to(embeds.dtype))
        embeds = embeds.masked_scatter(placeholders[..., None], img.reshape(-1, img.shape[-1]))
    return embeds, placeholders


def _qkv(attn, x, q_delta=None):
    b, s, _ = x.shape
    q = _head_norm(attn, "q_norm", _linear(attn.q_proj, x, q_delta).view(b, s, -1, attn.head_dim)).transpose(1, 2)
    k = _head_norm(attn, "k_norm", _linear(attn.k_proj, x).view(b, s, -1, attn.head_dim)).transpose(1, 2)
    v = _linear(attn.v_proj, x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    return q, k, v


def _finish(model, hidden):
    return model.lm_head(model.model.norm(hidden))


def pill_seed_logits(model, input_ids, image_features=None, attention_mask=None, stage=2):
    cfg = model.multimodal.config
    x, image = _embed(model, input_ids, image_features)
    b, s, _ = x.shape
    position_ids = torch.arange(s)[None].expand(b, s)
    cos, sin = model.model.rotary_emb(x, position_ids)
    layers = model.model.layers
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        xn = _rms(layer.input_layernorm, x)
        a = xn + _glu(xn, layer.pill_attn_adapter.experts["attn"])
        q, k, v = _qkv(attn, a)
        heads = q.shape[1]
        if stage == 2:
            g = torch.tanh(a @ layer.pill_value_gate.weight.to(a.dtype))  # [B, S, Hg]
            if cfg.gate_per == "query_head":
                v = v.repeat_interleave(heads // v.shape[1], dim=1)
            gated = v * g.transpose(1, 2)[..., None]
            m = image[:, None, :, None].expand_as(v)  # the seed repeats the mask to the value width
            v = torch.where(m, gated, v)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = _attention(q, k, v, attention_mask, window=_layer_window(model.config, index))
        h = x + attn.o_proj(o.transpose(1, 2).reshape(b, s, -1))
        hn = _rms(layer.post_attention_layernorm, h)
        route = image
        if stage == 1 and index == len(layers) - 1 and cfg.stage1_invert_last_layer:
            route = ~image
        experts = layer.pill_ffn_experts.experts
        e = torch.where(route[..., None], _glu(hn, experts["visual"]), _glu(hn, experts["text"]))
        x = h + layer.mlp(hn + e)
    return _finish(model, x)


def lavin_seed_logits(model, input_ids, image_features=None, attention_mask=None):
    """LaVIN with the modality token as a real position 0; returns the logits of the real positions."""
    mm = model.multimodal
    cfg = mm.config
    x, image = _embed(model, input_ids, image_features)
    b, s, d = x.shape
    indicator = image.any(dim=1).long()
    x = torch.cat([mm.modality_embedding[indicator].to(x.dtype)[:, None], x], dim=1)
    s1 = s + 1
    position_ids = torch.arange(s1)[None].expand(b, s1)
    cos, sin = model.model.rotary_emb(x, position_ids)
    mask = None
    if attention_mask is not None:
        mask = torch.cat([torch.ones(b, 1, dtype=attention_mask.dtype), attention_mask], dim=1)
    block_column0 = torch.zeros(s1, s1, dtype=torch.bool)
    block_column0[1:, 0] = True  # mask[:, :, 1:, 0] = -inf in the seed
    for index, layer in enumerate(model.model.layers):
        attn, router = layer.self_attn, layer.pill_router_adapter
        xn = _rms(layer.input_layernorm, x)
        w = torch.softmax(F.linear(xn[:, 0], router.router.weight.to(x.dtype), router.router.bias.to(x.dtype))
                          / cfg.temperature, dim=-1)
        z = F.conv1d(xn.transpose(1, 2), router.w_down.t().unsqueeze(-1).to(x.dtype), router.b_down.to(x.dtype))
        ups = [F.conv1d(z, router.w_up_grouped[e].unsqueeze(-1).to(x.dtype), router.b_up[e].to(x.dtype),
                        groups=cfg.groups) for e in range(cfg.num_experts)]
        mixed = sum(w[:, e, None, None] * ups[e] for e in range(cfg.num_experts))
        a = xn + cfg.scale * mixed.transpose(1, 2)
        q, k, v = _qkv(attn, a)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = _attention(q, k, v, mask, block_column0[None, None], _layer_window(model.config, index))
        o = o.transpose(1, 2).reshape(b, s1, -1)
        h = x + attn.o_proj(o)
        x = h + layer.mlp(layer.post_attention_layernorm(h))
    return _finish(model, x)[:, 1:]


def llama_adapter_v2_seed_logits(model, input_ids, image_features=None, attention_mask=None):
    mm = model.multimodal
    x = model.model.embed_tokens(input_ids)
    b, s, _ = x.shape
    visual = mm.projector(image_features.to(x.dtype)) if image_features is not None else None
    position_ids = torch.arange(s)[None].expand(b, s)
    cos, sin = model.model.rotary_emb(x, position_ids)
    for index, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        # Bias tuning on a projection that already has a pretrained bias adds a second, zero-init one.
        delta = {name: p.to(x.dtype) for name, p in getattr(layer, "pill_bias", {}).items()}
        xn = layer.input_layernorm(x)
        q, k, v = _qkv(attn, xn, delta.get("q_proj"))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = _attention(q, k, v, attention_mask, window=_layer_window(model.config, index))
        if layer.pill_has_prompt:
            adapter = layer.pill_prompt.to(x.dtype)[None].expand(b, -1, -1)
            if visual is not None:
                adapter = adapter + visual
            # The prompts' keys and values: the base's key / value path without RoPE (k norm included).
            ak = _head_norm(attn, "k_norm", _linear(attn.k_proj, adapter).view(b, -1, k.shape[1], attn.head_dim))
            ak = ak.transpose(1, 2)
            av = _linear(attn.v_proj, adapter).view(b, -1, k.shape[1], attn.head_dim).transpose(1, 2)
            rep = q.shape[1] // k.shape[1]
            ak, av = ak.repeat_interleave(rep, 1), av.repeat_interleave(rep, 1)
            sa = torch.softmax(q @ ak.transpose(-1, -2) / attn.head_dim ** 0.5, dim=-1)
            o = o + torch.tanh(layer.pill_prompt_gate.to(x.dtype))[None, :, None, None] * (sa @ av)
        h = x + _linear(attn.o_proj, o.transpose(1, 2).reshape(b, s, -1), delta.get("o_proj"))
        hn = layer.post_attention_layernorm(h)
        swiglu = F.silu(_linear(mlp.gate_proj, hn, delta.get("gate_proj"))) * _linear(mlp.up_proj, hn,
                                                                                      delta.get("up_proj"))
        x = h + _linear(mlp.down_proj, swiglu, delta.get("down_proj"))
    return _finish(model, x)
