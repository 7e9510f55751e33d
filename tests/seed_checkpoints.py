"""Tiny checkpoints in each seed's released layout (key names, shapes, Meta's RoPE row order), and forwards of
each seed's model written from the seed equations (docs/methods.md) over Meta-format weights.

Nothing here calls `pill`: the base is a transformers LlamaForCausalLM whose weights are turned into Meta's
layout by undoing transformers' q/k row permutation, and Meta's rotary embedding rotates interleaved pairs
(2j, 2j + 1), so a wrong permutation anywhere shows as different logits. Seed tensors are drawn in fp32 and
held in float64, so that the project's fp32 adapter parameters hold them exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def tiny_base(layers: int = 3, hidden: int = 32, heads: int = 4, ffn: int = 48, seed: int = 0) -> LlamaForCausalLM:
    """A float64 LLaMA without GQA (the seeds' LLaMA-1/2 7B have none), tied nothing, random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation="sdpa",
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape).float().double())
            else:
                p.copy_(torch.randn(p.shape).float().double() * 0.2)
    return model


def _meta_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k row order back to Meta's: per head, half-split pairs (j, j + hd/2) -> (2j, 2j + 1)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_weights(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The base in Meta's `consolidated.00.pth` names and layout."""
    c = model.config
    sd = model.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = _meta_rows(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        out[f"layers.{i}.attention.wk.weight"] = _meta_rows(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        out[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


def _rms(x, weight, eps=1e-6):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _meta_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's apply_rotary_emb: x [B, S, H, hd] as complex pairs (x[2j], x[2j+1]) times e^{i t theta^(-2j/hd)}."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = positions[:, :, None].double() * freqs  # [B, S, hd/2]
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def _theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    return theta if theta is not None else config.rope_parameters["rope_theta"]


def _linear(x, w, b=None):
    return F.linear(x, w, b)


def _causal_attention(q, k, v, valid_keys=None, extra_blocked=None):
    """q, k, v [B, S, H, hd]; returns [B, S, H, hd]; rows with no visible key give 0."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    s = q.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    blocked = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
    if valid_keys is not None:
        blocked = blocked | ~valid_keys[:, None, None, :]
    if extra_blocked is not None:
        blocked = blocked | extra_blocked
    probs = torch.softmax(scores.masked_fill(blocked, float("-inf")), -1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2)


def _meta_qkv(meta, i, x, heads, positions, config):
    """Layer i's q, k (Meta's rotary embedding applied) and v [B, S, H, hd] from the frozen Meta weights."""
    bsz, s, d = x.shape
    q, k, v = (_linear(x, meta[f"layers.{i}.attention.{w}.weight"]).view(bsz, s, heads, d // heads)
               for w in ("wq", "wk", "wv"))
    return _meta_rope(q, positions, _theta(config)), _meta_rope(k, positions, _theta(config)), v


def _ffn(meta, i, x, biases=None):
    b = biases or {}
    w1 = _linear(x, meta[f"layers.{i}.feed_forward.w1.weight"], b.get("w1"))
    w3 = _linear(x, meta[f"layers.{i}.feed_forward.w3.weight"], b.get("w3"))
    return _linear(F.silu(w1) * w3, meta[f"layers.{i}.feed_forward.w2.weight"], b.get("w2"))


def _positions(valid: torch.Tensor) -> torch.Tensor:
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------------------
# LLaMA-Adapter V2 (BIAS-7B layout)
# ----------------------------------------------------------------------------------------------------------

def _randn(*shape, scale=0.2):
    return (torch.randn(*shape) * scale).float().double()


LORA = {"attention.lora_wq": ("d", "d"), "attention.lora_wk": ("d", "kv"), "attention.lora_wv": ("d", "kv"),
        "attention.lora_wo": ("d", "d"), "feed_forward.lora_w1": ("d", "ffn"), "feed_forward.lora_w2": ("ffn", "d"),
        "feed_forward.lora_w3": ("d", "ffn")}  # (in, out) widths


def llama_adapter_v2_checkpoint(config: LlamaConfig, vision_dim=16, prompt_len=3, blocks=2, prompt_layers=None,
                                lora_rank=0, new_gate=False):
    """A BIAS-7B-shaped state dict at the tiny base's widths: every key `util/extract_adapter_from_checkpoint.py`
    keeps, layer 0's gate included, wq.bias in Meta's row order; with `lora_rank`, LORA-BIAS-7B's LoRA pairs in
    every layer (nonzero, so that they count), with `new_gate` V2.1's gate in every layer."""
    d, ffn, heads, layers = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                             config.num_hidden_layers)
    prompt_layers = prompt_layers or layers - 1
    c = vision_dim
    sd = {"clip_proj.weight": _randn(c, c), "clip_proj.bias": _randn(c), "clip_proj_norm.weight": 1 + _randn(c),
          "clip_proj_norm.bias": _randn(c), "visual_query.weight": _randn(prompt_len, c, scale=1.0),
          "visual_proj.weight": _randn(d, c), "visual_proj.bias": _randn(d), "visual_proj_norm.weight": 1 + _randn(d),
          "visual_proj_norm.bias": _randn(d), "adapter_query.weight": _randn(prompt_layers * prompt_len, d, scale=1.0),
          "llama.norm.weight": 1 + _randn(d)}
    for b in range(blocks):
        p = f"visual_blocks.{b}."
        sd.update({p + "norm1.weight": 1 + _randn(c), p + "norm1.bias": _randn(c),
                   p + "attn.qkv.weight": _randn(3 * c, c), p + "attn.qkv.bias": _randn(3 * c),
                   p + "attn.proj.weight": _randn(c, c), p + "attn.proj.bias": _randn(c),
                   p + "norm2.weight": 1 + _randn(c), p + "norm2.bias": _randn(c),
                   p + "mlp.fc1.weight": _randn(4 * c, c), p + "mlp.fc1.bias": _randn(4 * c),
                   p + "mlp.fc2.weight": _randn(c, 4 * c), p + "mlp.fc2.bias": _randn(c)})
    for i in range(layers):
        p = f"llama.layers.{i}."
        sd.update({p + "attention.gate": _randn(1, heads, 1, 1, scale=1.0), p + "attention.wq.bias": _randn(d),
                   p + "attention.wo.bias": _randn(d), p + "feed_forward.w1.bias": _randn(ffn),
                   p + "feed_forward.w3.bias": _randn(ffn), p + "feed_forward.w2.bias": _randn(d),
                   p + "attention_norm.weight": 1 + _randn(d), p + "ffn_norm.weight": 1 + _randn(d)})
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        widths = {"d": d, "ffn": ffn, "kv": kv_heads * (d // heads)}
        for name, (fan_in, fan_out) in LORA.items() if lora_rank else ():
            sd[p + name + "_l1.weight"] = _randn(lora_rank, widths[fan_in])
            sd[p + name + "_l2.weight"] = _randn(widths[fan_out], lora_rank)
        if new_gate:
            sd[p + "attention.new_gate"] = 1 + _randn(1, 1, 1, 1)
    return sd


def _lora(sd, p, name, x):
    """The seed's `lora_<name>_l2(lora_<name>_l1(x))`, or 0 without LoRA."""
    if p + name + "_l1.weight" not in sd:
        return 0
    return _linear(_linear(x, sd[p + name + "_l1.weight"]), sd[p + name + "_l2.weight"])


def _timm_block(sd, p, x, heads):
    """timm's Block: x + Attn(LN1 x), then x + MLP(LN2 x); qkv one matrix with bias, exact GELU."""
    b, n, c = x.shape
    h = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-5)
    qkv = _linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, -1)
    x = x + _linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-5)
    return x + _linear(F.gelu(_linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                       sd[p + "mlp.fc2.bias"])


def llama_adapter_v2_visual_query(sd, clip_features, heads):
    """The seed's forward_visual after CLIP: clip_proj + norm, queries prepended, timm blocks, first K tokens
    through visual_proj + norm."""
    c = clip_features.shape[-1]
    x = F.layer_norm(_linear(clip_features, sd["clip_proj.weight"], sd["clip_proj.bias"]), (c,),
                     sd["clip_proj_norm.weight"], sd["clip_proj_norm.bias"], 1e-5)
    queries = sd["visual_query.weight"]
    x = torch.cat([queries[None].expand(x.shape[0], -1, -1), x], 1)
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("visual_blocks.")})
    for b in blocks:
        x = _timm_block(sd, f"visual_blocks.{b}.", x, heads)
    x = _linear(x[:, :queries.shape[0]], sd["visual_proj.weight"], sd["visual_proj.bias"])
    d = x.shape[-1]
    return F.layer_norm(x, (d,), sd["visual_proj_norm.weight"], sd["visual_proj_norm.bias"], 1e-5)


def llama_adapter_v2_meta_logits(meta, sd, config, ids, valid, clip_features=None, visual_heads=4):
    """The seed's Transformer.forward over Meta weights with the checkpoint loaded (strict=False: its norms and
    biases replace the base's); `clip_features` None: no visual query (a text-only row)."""
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    prompt_len = sd["visual_query.weight"].shape[0]
    prompt_layers = sd["adapter_query.weight"].shape[0] // prompt_len
    prompts = sd["adapter_query.weight"].reshape(prompt_layers, prompt_len, -1)
    visual = None if clip_features is None else llama_adapter_v2_visual_query(sd, clip_features, visual_heads)
    h = meta["tok_embeddings.weight"][ids]
    bsz, s, d = h.shape
    hd = d // heads
    positions = _positions(valid)
    for i in range(layers):
        p, lp = f"layers.{i}.", f"llama.layers.{i}."
        x = _rms(h, sd[lp + "attention_norm.weight"])
        q = _linear(x, meta[p + "attention.wq.weight"], sd[lp + "attention.wq.bias"]) + _lora(sd, lp, "attention.lora_wq", x)
        k = _linear(x, meta[p + "attention.wk.weight"]) + _lora(sd, lp, "attention.lora_wk", x)
        v = _linear(x, meta[p + "attention.wv.weight"]) + _lora(sd, lp, "attention.lora_wv", x)
        q, k, v = (t.view(bsz, s, heads, hd) for t in (q, k, v))
        q, k = _meta_rope(q, positions, _theta(config)), _meta_rope(k, positions, _theta(config))
        out = _causal_attention(q, k, v, valid)
        j = i - (layers - prompt_layers)
        if j >= 0:
            adapter = prompts[j][None].expand(bsz, -1, -1)
            if visual is not None:
                adapter = adapter + visual
            ak = _linear(adapter, meta[p + "attention.wk.weight"]).view(bsz, -1, heads, hd).transpose(1, 2)
            av = _linear(adapter, meta[p + "attention.wv.weight"]).view(bsz, -1, heads, hd).transpose(1, 2)
            scores = sd[lp + "attention.gate"].tanh() * torch.softmax(q.transpose(1, 2) @ ak.transpose(-1, -2)
                                                                       / hd ** 0.5, -1)
            if lp + "attention.new_gate" in sd:
                scores = sd[lp + "attention.new_gate"] * scores
            out = out + (scores @ av).transpose(1, 2)
        out = out.reshape(bsz, s, d)
        h = h + _linear(out, meta[p + "attention.wo.weight"], sd[lp + "attention.wo.bias"]) \
            + _lora(sd, lp, "attention.lora_wo", out)
        x = _rms(h, sd[lp + "ffn_norm.weight"])
        w1 = _linear(x, meta[p + "feed_forward.w1.weight"], sd[lp + "feed_forward.w1.bias"]) \
            + _lora(sd, lp, "feed_forward.lora_w1", x)
        w3 = _linear(x, meta[p + "feed_forward.w3.weight"], sd[lp + "feed_forward.w3.bias"]) \
            + _lora(sd, lp, "feed_forward.lora_w3", x)
        product = F.silu(w1) * w3
        h = h + _linear(product, meta[p + "feed_forward.w2.weight"], sd[lp + "feed_forward.w2.bias"]) \
            + _lora(sd, lp, "feed_forward.lora_w2", product)
    return _linear(_rms(h, sd["llama.norm.weight"]), meta["output.weight"])


# ----------------------------------------------------------------------------------------------------------
# PILL
# ----------------------------------------------------------------------------------------------------------

def pill_checkpoint(config: LlamaConfig, vision_dim=16, rank=4):
    d, heads = config.hidden_size, config.num_attention_heads
    sd = {"vis_adapter_proj.weight": _randn(d, vision_dim)}
    for i in range(config.num_hidden_layers):
        for adapter in ("adapter_attn", "vis_adapter_ffn", "txt_adapter_ffn"):
            p = f"layers.{i}.{adapter}."
            sd.update({p + "down_sampler.weight": _randn(rank, d), p + "down_sampler_gate.weight": _randn(rank, d),
                       p + "up_sampler.weight": _randn(d, rank)})
        sd[f"layers.{i}.attention.vis_adapter_gate.weight"] = _randn(heads, d, scale=0.5)
    return sd


def _pill_glu(sd, p, x):
    return _linear(F.silu(_linear(x, sd[p + "down_sampler_gate.weight"])) * _linear(x, sd[p + "down_sampler.weight"]),
                   sd[p + "up_sampler.weight"])


def pill_meta_logits(meta, sd, config, ids, valid, image_token_id, q_features=None):
    """The seed's stage-2 forward (MAG on, no last-layer flip: its inference path): placeholders replaced by
    the projected Q-Former queries in order, GLU attention adapter on the normed input, MAG scaling image tokens'
    values per head, both FFN experts computed and selected by modality, the expert output added to the FFN
    input."""
    heads = config.num_attention_heads
    image = ids == image_token_id
    h = meta["tok_embeddings.weight"][ids.masked_fill(image, 0)]
    if q_features is not None:
        projected = _linear(q_features, sd["vis_adapter_proj.weight"]).reshape(-1, h.shape[-1])
        h = h.masked_scatter(image[..., None], projected)
    bsz, s, d = h.shape
    positions = _positions(valid)
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        xn = _rms(h, meta[p + "attention_norm.weight"])
        a = xn + _pill_glu(sd, p + "adapter_attn.", xn)
        q, k, v = _meta_qkv(meta, i, a, heads, positions, config)
        g = torch.tanh(_linear(a, sd[p + "attention.vis_adapter_gate.weight"]))  # [B, S, H]
        v = torch.where(image[..., None, None], g[..., None] * v, v)
        out = _causal_attention(q, k, v, valid)
        h = h + _linear(out.reshape(bsz, s, d), meta[p + "attention.wo.weight"])
        hn = _rms(h, meta[p + "ffn_norm.weight"])
        e = torch.where(image[..., None], _pill_glu(sd, p + "vis_adapter_ffn.", hn),
                        _pill_glu(sd, p + "txt_adapter_ffn.", hn))
        h = h + _ffn(meta, i, hn + e)
    return _linear(_rms(h, meta["norm.weight"]), meta["output.weight"])


# ----------------------------------------------------------------------------------------------------------
# LaVIN
# ----------------------------------------------------------------------------------------------------------

def lavin_checkpoint(config: LlamaConfig, vision_dim=16, rank=4, groups=2, mlp_hidden=8, vision_routers=0):
    """LaVIN's adapter keys; `vision_routers`: that many CLIP blocks with a router at the vision width."""
    d = config.hidden_size
    sd = {"adapter_proj.conv_A.weight": _randn(mlp_hidden, vision_dim), "adapter_proj.conv_A.bias": _randn(mlp_hidden),
          "adapter_proj.conv_B.weight": _randn(d, mlp_hidden), "adapter_proj.conv_B.bias": _randn(d),
          "adapter_modality_embedding.weight": _randn(2, d, scale=1.0)}
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}.adapter_attn."
        sd.update({p + "conv_A.weight": _randn(rank, d, 1), p + "conv_A.bias": _randn(rank),
                   p + "conv_B.weight": _randn(d, rank // groups, 1), p + "conv_B.bias": _randn(d),
                   p + "conv_D.weight": _randn(d, rank // groups, 1), p + "conv_D.bias": _randn(d),
                   p + "expert_weights.weight": _randn(2, d, scale=1.0), p + "expert_weights.bias": _randn(2)})
    for i in range(vision_routers):
        p = f"backbone.visual.transformer.resblocks.{i}.adapter_attn."
        sd.update({p + "conv_A.weight": _randn(rank, vision_dim, 1), p + "conv_A.bias": _randn(rank),
                   p + "conv_B.weight": _randn(vision_dim, rank // groups, 1), p + "conv_B.bias": _randn(vision_dim),
                   p + "conv_D.weight": _randn(vision_dim, rank // groups, 1), p + "conv_D.bias": _randn(vision_dim),
                   p + "expert_weights.weight": _randn(2, vision_dim, scale=1.0),
                   p + "expert_weights.bias": _randn(2)})
    return sd


def lavin_seed_router(sd, prefix, x, temperature, groups=2, scale=1.0):
    """The seed's RepAdapter_Router on x [..., d] from its checkpoint tensors, for one image (its batch-1
    behaviour: each token's own routing weights): softmax((x W_r + b_r) / T), the shared conv_A, the grouped
    conv_B / conv_D (each group of output channels reads its own slice of the bottleneck), x + s * mix."""
    w = torch.softmax(_linear(x, sd[prefix + "expert_weights.weight"], sd[prefix + "expert_weights.bias"])
                      / temperature, -1)
    z = _linear(x, sd[prefix + "conv_A.weight"][:, :, 0], sd[prefix + "conv_A.bias"])

    def grouped(name):
        weight, bias = sd[prefix + name + ".weight"][:, :, 0], sd[prefix + name + ".bias"]
        out_per, in_per = weight.shape[0] // groups, weight.shape[1]
        return torch.cat([z[..., g * in_per:(g + 1) * in_per] @ weight[g * out_per:(g + 1) * out_per].t()
                          for g in range(groups)], -1) + bias
    return x + scale * (w[..., :1] * grouped("conv_B") + w[..., 1:] * grouped("conv_D"))


def lavin_meta_logits(meta, sd, config, ids, valid, image_token_id, features=None, temperature=10.0, groups=2):
    """The seed's forward: the modality token at position 0, which no other token may attend to; the router
    from each layer's normed position-0 state; grouped 1x1 convolutions; logits of the real positions."""
    heads = config.num_attention_heads
    image = ids == image_token_id
    h = meta["tok_embeddings.weight"][ids.masked_fill(image, 0)]
    if features is not None:
        x = _linear(F.silu(_linear(features, sd["adapter_proj.conv_A.weight"], sd["adapter_proj.conv_A.bias"])),
                    sd["adapter_proj.conv_B.weight"], sd["adapter_proj.conv_B.bias"])
        h = h.masked_scatter(image[..., None], x.reshape(-1, h.shape[-1]))
    indicator = image.any(1).long()
    h = torch.cat([sd["adapter_modality_embedding.weight"][indicator][:, None], h], 1)
    valid = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
    bsz, s, d = h.shape
    positions = _positions(valid)
    blocked = torch.zeros(s, s, dtype=torch.bool)
    blocked[1:, 0] = True
    for i in range(config.num_hidden_layers):
        p, ap = f"layers.{i}.", f"layers.{i}.adapter_attn."
        xn = _rms(h, meta[p + "attention_norm.weight"])
        w = torch.softmax(_linear(xn[:, 0], sd[ap + "expert_weights.weight"], sd[ap + "expert_weights.bias"])
                          / temperature, -1)
        z = F.conv1d(xn.transpose(1, 2), sd[ap + "conv_A.weight"], sd[ap + "conv_A.bias"])
        up_b = F.conv1d(z, sd[ap + "conv_B.weight"], sd[ap + "conv_B.bias"], groups=groups)
        up_d = F.conv1d(z, sd[ap + "conv_D.weight"], sd[ap + "conv_D.bias"], groups=groups)
        a = xn + (w[:, 0, None, None] * up_b + w[:, 1, None, None] * up_d).transpose(1, 2)
        q, k, v = _meta_qkv(meta, i, a, heads, positions, config)
        out = _causal_attention(q, k, v, valid, blocked[None, None])
        h = h + _linear(out.reshape(bsz, s, d), meta[p + "attention.wo.weight"])
        h = h + _ffn(meta, i, _rms(h, meta[p + "ffn_norm.weight"]))
    return _linear(_rms(h, meta["norm.weight"]), meta["output.weight"])[:, 1:]


def meta_logits(meta, config, ids, valid):
    """The plain base in Meta's layout (a check of this file's layout and rotary embedding)."""
    heads = config.num_attention_heads
    h = meta["tok_embeddings.weight"][ids]
    bsz, s, d = h.shape
    positions = _positions(valid)
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        q, k, v = _meta_qkv(meta, i, _rms(h, meta[p + "attention_norm.weight"]), heads, positions, config)
        h = h + _linear(_causal_attention(q, k, v, valid).reshape(bsz, s, d), meta[p + "attention.wo.weight"])
        h = h + _ffn(meta, i, _rms(h, meta[p + "ffn_norm.weight"]))
    return _linear(_rms(h, meta["norm.weight"]), meta["output.weight"])
