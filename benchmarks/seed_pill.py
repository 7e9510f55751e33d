"""The PILL seed code's formulation of a decoder layer, re-expressed on the weights of an injected layer, as the
baseline users run today (docs/methods.md, PILL): eager attention with an S x S score matrix, both MoMAE experts
on every token selected with `where`, and the MAG mask repeated to the value width."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def _rms(norm, x):
    xf = x.float()
    return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def _glu(x, expert):
    return (F.silu(x @ expert.w_gate.to(x.dtype)) * (x @ expert.w_down.to(x.dtype))) @ expert.w_up.to(x.dtype)


def seed_pill_layer(layer, x: torch.Tensor, image: torch.Tensor, position_embeddings) -> torch.Tensor:
    """One PILL block in stage 2 as the seed computes it; x [B, S, D], image [B, S] bool."""
    attn = layer.self_attn
    batch, seq, _ = x.shape
    xn = _rms(layer.input_layernorm, x)
    a = xn + _glu(xn, layer.pill_attn_adapter.experts["attn"])
    q = attn.q_proj(a).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(a).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(a).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    gate = torch.tanh(a @ layer.pill_value_gate.weight.to(a.dtype))  # [B, S, H]
    repeated_mask = image[:, None, :, None].expand_as(v)
    v = torch.where(repeated_mask, v * gate.transpose(1, 2)[..., None], v)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / attn.head_dim ** 0.5
    causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    o = (torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v).transpose(1, 2).reshape(batch, seq, -1)
    h = x + attn.o_proj(o)
    hn = _rms(layer.post_attention_layernorm, h)
    experts = layer.pill_ffn_experts.experts
    e = torch.where(image[..., None], _glu(hn, experts["visual"]), _glu(hn, experts["text"]))
    return h + layer.mlp(hn + e)


def seed_pill_logits(model, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """A whole injected PILL model (stage 2) in the seed's formulation; one image run per sequence."""
    mm = model.multimodal
    placeholders = input_ids == mm.image_token_id
    x = model.model.embed_tokens(input_ids.masked_fill(placeholders, 0))
    projected = mm.projector(image_features.to(x.dtype))
    x = x.masked_scatter(placeholders[..., None], projected.reshape(-1, projected.shape[-1]))
    positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
    position_embeddings = model.model.rotary_emb(x, positions)
    for layer in model.model.layers:
        x = seed_pill_layer(layer, x, placeholders, position_embeddings)
    return model.lm_head(model.model.norm(x))
