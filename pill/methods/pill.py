"""PILL (docs/methods.md, PILL): a GLU attention adapter, the modality attention gate (MAG) and MoMAE experts in
every layer, trained in two stages. Its whole definition: config, adapter modules, decoder layer, model-level
module, inject function, stage parameter sets and registry record."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

import pill_kernels as pk

from ..hf_compat import take_cache
from ..model import MultimodalCausalLM, attach_method, check_base
from ..seed_format import AdapterTensors, SeedConversion, SeedKeys, build_method_config
from .base import (Method, MethodConfig, MLPProjector, MultimodalAdapter, MultimodalDecoderLayer, check_vision_dim,
                   attention_structure, image_mask, parameters_where, pop_multimodal, register_family_layers,
                   rms_norm_args, swap_layers)


@dataclass
class PillConfig(MethodConfig):
    """PILL: a GLU attention adapter, the modality attention gate (MAG) and MoMAE experts in every layer.

    adapter_dim: GLU bottleneck r (seed: 32).
    gate_per: "kv_head" gates each key/value head's values before attention (works with any attention
        implementation and the KV cache); "query_head" gives each query head its own gate inside the attention,
        which only differs from "kv_head" on GQA models.
    stage1_invert_last_layer: in stage 1 the seed routes the last layer's text tokens to the visual expert (and
        image tokens to the text expert) so that the last visual expert gets a gradient.
    projector: "linear" (seed: Linear(C, D), no bias) or "mlp" (Linear-SiLU-Linear).
    backend: kernel backend of the fused ops at injection (run-time only; see `MethodConfig`).
    """

    method: ClassVar[str] = "pill"
    stages: ClassVar[tuple[int, ...]] = (1, 2)

    adapter_dim: int = 32
    gate_per: str = "kv_head"
    stage1_invert_last_layer: bool = True
    projector: str = "linear"
    projector_hidden: int = 1024
    backend: str | None = None

    def __post_init__(self) -> None:
        self._positive(adapter_dim=self.adapter_dim, projector_hidden=self.projector_hidden)
        if self.gate_per not in ("kv_head", "query_head"):
            raise ValueError(f"PillConfig.gate_per must be 'kv_head' or 'query_head', got {self.gate_per!r}")
        if self.projector not in ("linear", "mlp"):
            raise ValueError(f"PillConfig.projector must be 'linear' or 'mlp', got {self.projector!r}")
        self._check_backend()


# ----------------------------------------------------------------------------------------------------------
# Adapter modules
# ----------------------------------------------------------------------------------------------------------

class GLUExpert(nn.Module):
    """One PILL GLU adapter ``W_up(SiLU(x W_gate) * (x W_down))`` with the seed's initialisation (W_up = 0)."""

    def __init__(self, hidden_size: int, adapter_dim: int):
        super().__init__()
        self.w_down = nn.Parameter(torch.empty(hidden_size, adapter_dim))
        self.w_gate = nn.Parameter(torch.empty(hidden_size, adapter_dim))
        self.w_up = nn.Parameter(torch.zeros(adapter_dim, hidden_size))
        nn.init.normal_(self.w_down, std=0.02)
        # nn.Linear's default initialisation, which the seed keeps for the gate projection.
        bound = 1.0 / math.sqrt(hidden_size)
        nn.init.uniform_(self.w_gate, -bound, bound)


class RoutedGLUAdapter(nn.Module):
    """Hard-routed GLU experts with their input skip: ``n + A_{expert(t)}(n)``, optionally ``n = RMSNorm(x)``.

    One expert is PILL's attention adapter; two (``text``, ``visual``) are MoMAE, routed by modality.
    """

    def __init__(self, hidden_size: int, adapter_dim: int, expert_names: tuple[str, ...],
                 kernel_backend: str | None = None):
        super().__init__()
        self.expert_names = expert_names
        self.experts = nn.ModuleDict({name: GLUExpert(hidden_size, adapter_dim) for name in expert_names})
        self.kernel_backend = kernel_backend

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None, norm: nn.Module | None = None):
        experts = [self.experts[name] for name in self.expert_names]
        stack = lambda attr: torch.stack([getattr(e, attr) for e in experts]).to(x.dtype)  # noqa: E731
        return pk.routed_glu_adapter(x, stack("w_down"), stack("w_gate"), stack("w_up"), expert_ids,
                                     backend=self.kernel_backend, **rms_norm_args(norm, x.dtype))


class ModalityGate(nn.Module):
    """PILL's MAG weights ``W_g`` [D, heads], zero-initialised so that image tokens' values start switched off."""

    def __init__(self, hidden_size: int, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size, heads))


class LinearProjector(nn.Module):
    """PILL's projection: Linear(C, D) without bias, N(0, 0.02)."""

    def __init__(self, vision_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(vision_dim, hidden_size, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


# ----------------------------------------------------------------------------------------------------------
# Decoder layer
# ----------------------------------------------------------------------------------------------------------

class PillDecoderLayer(MultimodalDecoderLayer):
    """PILL block (docs/methods.md, PILL):

        a = n + A_att(n),  n = RMSNorm_att(x)              (one fused routed-adapter call)
        V <- tanh(a W_g) * V for image tokens (MAG, stage 2)
        h = x + Attn(a)
        u = m + A_{vis|txt}(m),  m = RMSNorm_ffn(h)       (MoMAE, one fused call, own expert per token)
        y = h + FFN(u)
    """

    TEXT, VISUAL = 0, 1

    def pill_init(self, config, pill_config: PillConfig, is_last_layer: bool) -> None:
        hidden = config.hidden_size
        r = pill_config.adapter_dim
        self.pill_attn_adapter = RoutedGLUAdapter(hidden, r, ("attn",))
        self.pill_ffn_experts = RoutedGLUAdapter(hidden, r, ("text", "visual"))
        heads = config.num_attention_heads if pill_config.gate_per == "query_head" else config.num_key_value_heads
        self.pill_value_gate = ModalityGate(hidden, heads)
        self.pill_gate_per = pill_config.gate_per
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
        mm = pop_multimodal(kwargs)
        image = image_mask(mm["mm_token_type_ids"], hidden_states)
        residual = hidden_states
        a = self.pill_attn_adapter(hidden_states, norm=self.input_layernorm)
        q, k, v = self._qkv(a)
        if self.pill_gate_enabled and self.pill_gate_per == "kv_head":
            # Gate before the cache so that cached image values are already gated (decoding sees text only).
            v = pk.modality_gate(a.to(v.dtype), self.pill_value_gate.weight.to(v.dtype), v, image,
                                 backend=self.kernel_backend)
        v = v.transpose(1, 2)
        q, k, v = self._rope_and_cache(q, k, v, position_embeddings, cache)
        if self.pill_gate_enabled and self.pill_gate_per == "query_head":
            gate_logits = (a @ self.pill_value_gate.weight.to(a.dtype)).transpose(1, 2).to(q.dtype)
            gate_logits, key_image = self._cached_gate_logits(gate_logits, image, cache, k.shape[2])
            with self._attention_precision(q) as cast:
                attn_out = pk.gated_attention(
                    cast(q), cast(k), cast(v), gate_logits=cast(gate_logits), image_mask=key_image,
                    scale=self.self_attn.scaling, backend=self.kernel_backend,
                    **attention_structure(attention_mask, mm["mm_sequence_ids"], q.shape[0], k.shape[2],
                                          self.attention_window))
            attn_out = attn_out.to(q.dtype).transpose(1, 2)
            attn_out = attn_out.reshape(*attn_out.shape[:2], -1)
        else:
            attn_out = self._standard_attention(q, k, v, attention_mask, kwargs)
        h = residual + self.self_attn.o_proj(attn_out)
        u = self.pill_ffn_experts(h, self.pill_expert_ids(image), norm=self.post_attention_layernorm)
        return h + self.mlp(u)

    def _cached_gate_logits(self, gate_logits, image, cache, keys: int):
        """Per-query-head gates [B, H, keys] and image flags [B, keys] of the `keys` keys the cache returned
        (the last ones seen: all of them, or a sliding window's); the cache holds values ungated in this mode, so
        the gates of the keys it keeps are kept beside it, with the number of tokens seen."""
        if cache is None:
            return gate_logits, image
        store = cache.__dict__.setdefault("_pill_query_head_gates", {})
        layer = self.self_attn.layer_idx
        seen = cache.get_seq_length(layer)
        if layer in store and store[layer][2] + gate_logits.shape[-1] == seen:
            gate_logits = torch.cat([store[layer][0], gate_logits], dim=-1)
            image = torch.cat([store[layer][1], image], dim=-1)
        elif gate_logits.shape[-1] != seen:
            raise RuntimeError("PILL gate_per='query_head': the KV cache holds keys whose gates were not recorded "
                               "(a cache filled outside this model, or reordered / cropped); start a new cache")
        if keys > gate_logits.shape[-1]:
            raise RuntimeError(f"PILL gate_per='query_head': the KV cache returned {keys} keys for "
                               f"{gate_logits.shape[-1]} tokens seen (a preallocated cache); use a DynamicCache")
        gate_logits, image = gate_logits[..., -keys:], image[..., -keys:]
        store[layer] = (gate_logits.detach(), image, seen)
        return gate_logits, image


register_family_layers(PillDecoderLayer)


# ----------------------------------------------------------------------------------------------------------
# Model level, stages, injection
# ----------------------------------------------------------------------------------------------------------

class PillMultimodal(MultimodalAdapter):
    method = "pill"

    def __init__(self, config: PillConfig, vision_dim: int, hidden_size: int, image_token_id: int):
        super().__init__(config, vision_dim, image_token_id)
        self.projector = (LinearProjector(vision_dim, hidden_size) if config.projector == "linear"
                          else MLPProjector(vision_dim, config.projector_hidden, hidden_size))

    def stage_parameters(self, model, stage: int) -> dict[str, nn.Parameter]:
        if stage == 1:  # projector + visual experts (docs/methods.md, PILL; the unused gates are left out)
            return parameters_where(model, lambda n: n.startswith("multimodal.projector.") or ".experts.visual." in n)
        return parameters_where(model, lambda n: n.startswith("multimodal.") or ".pill_" in n)

    def apply_stage(self, model, stage: int) -> None:
        for layer in model.model.layers:
            layer.pill_stage = stage


def inject_pill(model, config: PillConfig | None = None, *, vision_dim: int, image_token_id: int,
                vision_encoder=None) -> MultimodalCausalLM:
    """Add PILL to `model` (a transformers CausalLM of a supported family, `pill.families`) in place, in all
    layers: attention adapter, MAG, MoMAE; returns the model.

    At initialisation a text-only input gives the base model's logits (zero up-projections; MAG only touches
    image tokens). The model starts in stage 1 (training order); ``set_stage(model, 2)`` moves on.
    """
    config = config or PillConfig()
    family = check_base(model)
    check_vision_dim(vision_dim)
    hc = model.config
    last = hc.num_hidden_layers - 1
    swap_layers(model, PillDecoderLayer, family, lambda i, layer: layer.pill_init(hc, config, i == last))
    return attach_method(model, family, PillMultimodal(config, vision_dim, hc.hidden_size, image_token_id),
                         vision_encoder)


# ----------------------------------------------------------------------------------------------------------
# The seed's released checkpoints
# ----------------------------------------------------------------------------------------------------------

# The seed adds "<image_placeholder>" to the Llama-2 tokenizer as id 32000 (its embedding table keeps 32000 rows).
SEED_IMAGE_TOKEN_ID = 32000
# The seed's GLU adapters, as nn.Linear modules ([out, in] weights), and the expert each becomes here.
_SEED_GLU = {"adapter_attn": ("pill_attn_adapter", "attn"), "vis_adapter_ffn": ("pill_ffn_experts", "visual"),
             "txt_adapter_ffn": ("pill_ffn_experts", "text")}


def convert_seed_checkpoint(keys: SeedKeys, base, overrides: dict, image_token_id: int | None) -> SeedConversion:
    """PILL's training checkpoint (``layers.{i}.{adapter_attn,vis_adapter_ffn,txt_adapter_ffn}.{down_sampler,
    down_sampler_gate,up_sampler}.weight``, ``layers.{i}.attention.vis_adapter_gate.weight``,
    ``vis_adapter_proj.weight``) as this project's PILL adapter. The seed's nn.Linear weights are [out, in];
    the GLU matrices here are [in, out], so every adapter matrix is transposed. Nothing lives in q/k space (MAG
    scales the values), so nothing is permuted. The bottleneck, the vision width and the gate's heads are read
    off the shapes."""
    hidden, layers = base.hidden_size, base.num_hidden_layers
    down = keys.shape("layers.0.adapter_attn.down_sampler.weight")
    rank = down[0] if down else 32
    projector = keys.shape("vis_adapter_proj.weight")
    vision_dim = projector[1] if projector else 0
    gate = keys.shape("layers.0.attention.vis_adapter_gate.weight")
    gate_heads = gate[0] if gate else base.num_key_value_heads
    kv_heads = getattr(base, "num_key_value_heads", None) or base.num_attention_heads
    gate_per = "kv_head" if gate_heads == kv_heads else "query_head"
    config = build_method_config(PillConfig, {"adapter_dim": rank, "gate_per": gate_per, "projector": "linear"},
                                 overrides, keys.where)
    tensors = AdapterTensors()
    put = tensors.put

    for i in range(layers):
        for seed_name, (module, expert) in _SEED_GLU.items():
            prefix = f"layers.{i}.{seed_name}"
            ours = f"model.layers.{i}.{module}.experts.{expert}"
            put(f"{ours}.w_down", keys.take(f"{prefix}.down_sampler.weight", (rank, hidden)), torch.t)
            put(f"{ours}.w_gate", keys.take(f"{prefix}.down_sampler_gate.weight", (rank, hidden)), torch.t)
            put(f"{ours}.w_up", keys.take(f"{prefix}.up_sampler.weight", (hidden, rank)), torch.t)
        put(f"model.layers.{i}.pill_value_gate.weight",
            keys.take(f"layers.{i}.attention.vis_adapter_gate.weight", (gate_heads, hidden)), torch.t)
    put("multimodal.projector.proj.weight", keys.take("vis_adapter_proj.weight", (hidden, vision_dim)))
    keys.finish()
    notes = [f"adapter_dim {rank}, MAG gates per {'key/value' if gate_per == 'kv_head' else 'query'} head "
             f"({gate_heads}), vision width {vision_dim} (BLIP-2 Q-Former queries)"]
    return SeedConversion(config, vision_dim, SEED_IMAGE_TOKEN_ID if image_token_id is None else image_token_id,
                          tensors, notes)


def _vllm_refusal(config: dict) -> str | None:
    if config.get("gate_per", "kv_head") != "kv_head":
        return (f"gate_per={config['gate_per']!r}: query-head gates act inside the attention on every cached key, "
                f"where vLLM's attention has no hook; train with gate_per='kv_head'")
    return None


METHOD = Method(
    name="pill", config_class=PillConfig, inject=inject_pill, image_placeholders=True,
    # A 16-wide bottleneck fits the demo's 135M model and CPU budget (the seed's 32 is for 7B).
    demo_config={"adapter_dim": 16},
    convert_seed=convert_seed_checkpoint,
    vllm_refusal=_vllm_refusal,
)
