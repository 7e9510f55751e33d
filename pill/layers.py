"""Decoder layers of the three methods, as subclasses of transformers' LlamaDecoderLayer.

Injection swaps each layer's class for one of these and adds the adapter submodules; the base weights stay
where they are. Because the subclass's forward goes through GradientCheckpointingLayer's wrapper, gradient
checkpointing still recomputes the patched layers (overriding ``forward`` on an instance would bypass it).

Per-call multimodal inputs arrive as keyword arguments that transformers passes to every decoder layer:
``mm_token_type_ids`` [B, S] (1 for image tokens), ``mm_routing_weights`` [B, L, E] (LaVIN) and
``mm_visual_prompts`` [B, K, D] (LLaMA-Adapter V2).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import (ALL_ATTENTION_FUNCTIONS, LlamaDecoderLayer,
                                                      apply_rotary_pos_emb, eager_attention_forward)

import pill_kernels as pk

from .hf_compat import take_cache
from .modules import ModalityGate, RoutedGLUAdapter, SoftRoutedAdapter

MULTIMODAL_LAYER_KWARGS = ("mm_token_type_ids", "mm_routing_weights", "mm_visual_prompts")


def _pop_multimodal(kwargs: dict) -> dict:
    return {name: kwargs.pop(name, None) for name in MULTIMODAL_LAYER_KWARGS}


def _image_mask(mm_token_type_ids: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor:
    if mm_token_type_ids is None:
        return torch.zeros(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
    if tuple(mm_token_type_ids.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"mm_token_type_ids must have shape [batch, seq] = {tuple(hidden_states.shape[:2])}, got "
                         f"{tuple(mm_token_type_ids.shape)}")
    return mm_token_type_ids.to(torch.bool)


def key_padding_from_attention_mask(attention_mask: torch.Tensor | None, batch: int, seq_k: int):
    """Which keys are real tokens, read off the mask transformers builds for the attention functions.

    The last query row of a causal mask sees every earlier key, so it holds the padding of all keys (with left
    padding the last position is a real token; with right padding its row still excludes only padding).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        valid = attention_mask.to(torch.bool)
    else:
        row = attention_mask[:, 0, -1, :]
        valid = row if row.dtype == torch.bool else row == 0
    return valid[:, :seq_k].expand(batch, seq_k)


class _MultimodalDecoderLayer(LlamaDecoderLayer):
    """Helpers shared by the method layers; never instantiated directly."""

    def _qkv(self, attn_input: torch.Tensor):
        attn = self.self_attn
        batch, seq = attn_input.shape[:2]
        q = attn.q_proj(attn_input).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(attn_input).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(attn_input).view(batch, seq, -1, attn.head_dim)  # [B, S, Hkv, hd] for the value gate
        return q, k, v

    def _standard_attention(self, q, k, v, attention_mask, kwargs) -> torch.Tensor:
        attn = self.self_attn
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                                    eager_attention_forward)
        out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0 if not self.training else
                           attn.attention_dropout, scaling=attn.scaling, **kwargs)
        return out.reshape(*out.shape[:2], -1)

    def _rope_and_cache(self, q, k, v, position_embeddings, cache):
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.self_attn.layer_idx)
        return q, k, v

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class PillDecoderLayer(_MultimodalDecoderLayer):
    """PILL block (docs/methods.md, PILL):

        a = n + A_att(n),  n = RMSNorm_att(x)              (one fused routed-adapter call)
        V <- tanh(a W_g) * V for image tokens (MAG, stage 2)
        h = x + Attn(a)
        u = m + A_{vis|txt}(m),  m = RMSNorm_ffn(h)       (MoMAE, one fused call, own expert per token)
        y = h + FFN(u)
    """

    TEXT, VISUAL = 0, 1

    def pill_init(self, config, pill_config, is_last_layer: bool) -> None:
        hidden = config.hidden_size
        r, backend = pill_config.adapter_dim, pill_config.backend
        self.pill_attn_adapter = RoutedGLUAdapter(hidden, r, ("attn",), backend)
        self.pill_ffn_experts = RoutedGLUAdapter(hidden, r, ("text", "visual"), backend)
        heads = config.num_attention_heads if pill_config.gate_per == "query_head" else config.num_key_value_heads
        self.pill_value_gate = ModalityGate(hidden, heads)
        self.pill_gate_per = pill_config.gate_per
        self.pill_backend = backend
        self.pill_is_last_layer = is_last_layer
        self.pill_invert_last_layer = pill_config.stage1_invert_last_layer
        self.pill_stage = 2

    @property
    def pill_gate_enabled(self) -> bool:
        return self.pill_stage >= 2  # the seed bypasses MAG in stage 1 (do_pretrain)

    def pill_expert_ids(self, image: torch.Tensor) -> torch.Tensor:
        ids = image.to(torch.long)
        if self.pill_stage == 1 and self.pill_is_last_layer and self.pill_invert_last_layer:
            ids = 1 - ids
        return ids

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        cache = take_cache(kwargs, past_key_values)
        mm = _pop_multimodal(kwargs)
        image = _image_mask(mm["mm_token_type_ids"], hidden_states)
        residual = hidden_states
        a = self.pill_attn_adapter(hidden_states, norm=self.input_layernorm)
        q, k, v = self._qkv(a)
        if self.pill_gate_enabled and self.pill_gate_per == "kv_head":
            # Gate before the cache so that cached image values are already gated (decoding sees text only).
            v = pk.modality_gate(a, self.pill_value_gate.weight.to(a.dtype), v, image, backend=self.pill_backend)
        v = v.transpose(1, 2)
        q, k, v = self._rope_and_cache(q, k, v, position_embeddings, cache)
        if self.pill_gate_enabled and self.pill_gate_per == "query_head":
            gate_logits = (a @ self.pill_value_gate.weight.to(a.dtype)).transpose(1, 2)
            gate_logits, key_image = self._cached_gate_logits(gate_logits, image, cache)
            attn_out = pk.gated_attention(
                q, k, v, gate_logits=gate_logits, image_mask=key_image,
                key_padding_mask=key_padding_from_attention_mask(attention_mask, q.shape[0], k.shape[2]),
                scale=self.self_attn.scaling, backend=self.pill_backend).transpose(1, 2)
            attn_out = attn_out.reshape(*attn_out.shape[:2], -1)
        else:
            attn_out = self._standard_attention(q, k, v, attention_mask, kwargs)
        h = residual + self.self_attn.o_proj(attn_out)
        u = self.pill_ffn_experts(h, self.pill_expert_ids(image), norm=self.post_attention_layernorm)
        return h + self.mlp(u)

    def _cached_gate_logits(self, gate_logits, image, cache):
        """Per-query-head gates of every key seen so far; the cache holds values ungated in this mode."""
        if cache is None:
            return gate_logits, image
        store = cache.__dict__.setdefault("_pill_query_head_gates", {})
        layer = self.self_attn.layer_idx
        if layer in store and store[layer][0].shape[-1] + gate_logits.shape[-1] == \
                cache.get_seq_length(layer):
            gate_logits = torch.cat([store[layer][0], gate_logits], dim=-1)
            image = torch.cat([store[layer][1], image], dim=-1)
        elif gate_logits.shape[-1] != cache.get_seq_length(layer):
            raise RuntimeError("PILL gate_per='query_head': the KV cache holds keys whose gates were not recorded "
                               "(a cache filled outside this model, or reordered / cropped); start a new cache")
        store[layer] = (gate_logits.detach(), image)
        return gate_logits, image


class LavinDecoderLayer(_MultimodalDecoderLayer):
    """LaVIN block (docs/methods.md, LaVIN; the seed's adapter_type='attn'):

        a = n + s * sum_e w_e (z W_up_e + b_e),  z = drop(n W_down + b),  n = RMSNorm_att(x)   (one fused call)
        h = x + Attn(a);  y = h + FFN(RMSNorm_ffn(h))

    ``w`` comes per sequence from the modality token's state at this layer (see `modality_token_step`).
    """

    def pill_init(self, config, lavin_config) -> None:
        self.pill_router_adapter = SoftRoutedAdapter(
            config.hidden_size, lavin_config.adapter_dim, lavin_config.groups, lavin_config.num_experts,
            lavin_config.scale, lavin_config.temperature, lavin_config.dropout, lavin_config.backend)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        cache = take_cache(kwargs, past_key_values)
        mm = _pop_multimodal(kwargs)
        routing = mm["mm_routing_weights"]
        if routing is None:
            raise ValueError("LaVIN layers need mm_routing_weights; call the injected model, not its layers")
        residual = hidden_states
        a = self.pill_router_adapter(hidden_states, routing[:, self.self_attn.layer_idx],
                                     norm=self.input_layernorm)
        q, k, v = self._qkv(a)
        q, k, v = self._rope_and_cache(q, k, v.transpose(1, 2), position_embeddings, cache)
        h = residual + self.self_attn.o_proj(self._standard_attention(q, k, v, attention_mask, kwargs))
        return self._feed_forward(h)

    def modality_token_step(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer of LaVIN's modality token: (routing weights [B, E], state after this layer [B, D]).

        The seed prepends the token at position 0 and masks it from every other query, so it attends only to
        itself: its attention output is ``o_proj(v_proj(a))`` with each query head reading its KV head, and its
        state depends on the modality bit alone. Computing that here gives the seed's routing exactly, for any
        batch, without an extra sequence position.
        """
        attn = self.self_attn
        norm = self.input_layernorm
        weights = self.pill_router_adapter.routing_weights(pk.reference.rms_norm(state, norm.weight,
                                                                                 norm.variance_epsilon))
        a = self.pill_router_adapter(state, weights, norm=self.input_layernorm)
        v = attn.v_proj(a).view(state.shape[0], -1, attn.head_dim)
        v = v.repeat_interleave(attn.num_key_value_groups, dim=1).reshape(state.shape[0], -1)
        h = state + attn.o_proj(v)
        return weights, self._feed_forward(h)


class LlamaAdapterV2DecoderLayer(_MultimodalDecoderLayer):
    """LLaMA-Adapter V2 block (docs/methods.md, LLaMA-Adapter V2). Layers with prompts compute

        O = softmax(QK^T/sqrt(d) + M) V + tanh(g) * softmax(Q K_p^T/sqrt(d)) V_p,
        K_p, V_p = (P_l + Vq) W_k, (P_l + Vq) W_v   (frozen projections, no RoPE)

    in one gated-attention call; layers without prompts are the plain block (with tuned biases / norms).
    """

    def pill_init(self, config, adapter_config, has_prompt: bool) -> None:
        self.pill_has_prompt = has_prompt
        self.pill_backend = adapter_config.backend
        if has_prompt:
            self.pill_prompt = nn.Parameter(torch.randn(adapter_config.prompt_len, config.hidden_size))
            self.pill_prompt_gate = nn.Parameter(torch.zeros(config.num_attention_heads))

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        cache = take_cache(kwargs, past_key_values)
        mm = _pop_multimodal(kwargs)
        residual = hidden_states
        x = self.input_layernorm(hidden_states)
        q, k, v = self._qkv(x)
        q, k, v = self._rope_and_cache(q, k, v.transpose(1, 2), position_embeddings, cache)
        if self.pill_has_prompt:
            attn = self.self_attn
            batch = q.shape[0]
            prompt = self.pill_prompt.to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
            if mm["mm_visual_prompts"] is not None:
                prompt = prompt + mm["mm_visual_prompts"].to(x.dtype)
            prompt_k = attn.k_proj(prompt).view(batch, prompt.shape[1], -1, attn.head_dim).transpose(1, 2)
            prompt_v = attn.v_proj(prompt).view(batch, prompt.shape[1], -1, attn.head_dim).transpose(1, 2)
            attn_out = pk.gated_attention(
                q, k, v, key_padding_mask=key_padding_from_attention_mask(attention_mask, batch, k.shape[2]),
                prompt_k=prompt_k, prompt_v=prompt_v, prompt_gate=self.pill_prompt_gate.to(x.dtype),
                scale=attn.scaling, backend=self.pill_backend).transpose(1, 2)
            attn_out = attn_out.reshape(*attn_out.shape[:2], -1)
        else:
            attn_out = self._standard_attention(q, k, v, attention_mask, kwargs)
        h = residual + self.self_attn.o_proj(attn_out)
        return self._feed_forward(h)
