"""LLaMA-Adapter V2 (docs/methods.md, LLaMA-Adapter V2): zero-init gated adaption prompts in the last layers,
visual features added to them, and bias / norm tuning, trained in two stages. Its whole definition: config,
visual-prompt projector, decoder layer, model-level module, inject function, stage parameter sets and registry
record."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import pill_kernels as pk

from ..hf_compat import take_cache
from ..model import MultimodalCausalLM, attach_method, check_base
from ..packing import number_of_examples, row_examples
from ..seed_format import (AdapterTensors, SeedCheckpointError, SeedConversion, SeedKeys, build_method_config,
                           layer_indices, rope_rows_to_hf)
from .base import (Method, MethodConfig, MultimodalAdapter, MultimodalDecoderLayer, attention_structure,
                   check_vision_dim, parameters_where, pop_multimodal, register_family_layers, swap_layers)


@dataclass
class LlamaAdapterV2Config(MethodConfig):
    """LLaMA-Adapter V2: zero-init gated adaption prompts in the last layers, visual features added to them,
    and bias / norm tuning.

    prompt_len: prompts per layer K (seed: 10); prompt_layers: how many of the last layers get prompts (None:
    all but the first, as the seed's 31 of 32); bias_tuning: zero-init biases on q, o, gate, up, down
    projections (beside a pretrained bias, which stays frozen, where the base has one: Qwen2's q); norm_tuning:
    the residual stream's RMSNorm weights (each layer's two and the final one) trainable in stage 2, not Qwen3's
    per-head q/k norms; visual_blocks / visual_heads: the transformer blocks that turn image features into the
    K visual prompts (seed: 8 blocks of 16 heads);
    lora_rank: LLaMA-Adapter V2.1's LoRA of this rank (scale 1, the seed's) on the q, k, v, o projections and the
    three FFN projections, trained in stage 2 (0: none, as BIAS-7B); new_gate: V2.1's scalar gate (init 1) on
    the prompt branch, trained in stage 2; visual_query_std: standard deviation of the learned visual queries at
    initialisation (seed: 1, nn.Embedding's; smaller lets the image dominate the visual prompts from the start,
    docs/demo.md); backend: kernel backend of the fused ops at injection (run-time only;
    see `MethodConfig`).
    """

    method: ClassVar[str] = "llama_adapter_v2"
    stages: ClassVar[tuple[int, ...]] = (1, 2)

    prompt_len: int = 10
    prompt_layers: int | None = None
    bias_tuning: bool = True
    norm_tuning: bool = True
    visual_blocks: int = 8
    visual_heads: int = 16
    lora_rank: int = 0
    new_gate: bool = False
    visual_query_std: float = 1.0
    backend: str | None = None

    def __post_init__(self) -> None:
        self._positive(prompt_len=self.prompt_len, visual_heads=self.visual_heads)
        if (not isinstance(self.visual_query_std, (int, float)) or isinstance(self.visual_query_std, bool)
                or not self.visual_query_std > 0):
            raise ValueError(f"LlamaAdapterV2Config.visual_query_std must be a positive number, "
                             f"got {self.visual_query_std!r}")
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise ValueError(f"LlamaAdapterV2Config.lora_rank must be a non-negative integer, got {self.lora_rank!r}")
        if self.prompt_layers is not None:
            self._positive(prompt_layers=self.prompt_layers)
        if not isinstance(self.visual_blocks, int) or self.visual_blocks < 0:
            raise ValueError(f"LlamaAdapterV2Config.visual_blocks must be a non-negative integer, "
                             f"got {self.visual_blocks!r}")
        self._check_backend()


class VisualPromptProjector(nn.Module):
    """LLaMA-Adapter V2's visual query: ``LN(W_c F)``, K learned queries prepended, transformer blocks, the
    first K outputs projected to the LLM width and normalised. Returns [B, K, D]."""

    def __init__(self, vision_dim: int, hidden_size: int, num_queries: int, blocks: int, heads: int,
                 query_std: float = 1.0):
        super().__init__()
        if vision_dim % heads:
            raise ValueError(f"LLaMA-Adapter V2: vision_dim {vision_dim} must be a multiple of visual_heads {heads}")
        self.clip_proj = nn.Linear(vision_dim, vision_dim)
        self.clip_norm = nn.LayerNorm(vision_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, vision_dim) * query_std)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(vision_dim, heads, 4 * vision_dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(blocks)])
        self.out_proj = nn.Linear(vision_dim, hidden_size)
        self.out_norm = nn.LayerNorm(hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.clip_norm(self.clip_proj(features))
        queries = self.queries.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([queries, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(self.out_proj(x[:, :queries.shape[1]]))


class LowRankDelta(nn.Module):
    """V2.1's LoRA on one frozen projection: ``x A^T B^T`` (scale 1), A [r, in] with nn.Linear's initialisation
    and B [out, r] zero, as the seed's ``lora_*_l1`` / ``lora_*_l2``, so that it starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))


# The projections V2.1's LoRA adapts (transformers' names), and the seed's names for them.
LORA_TARGETS = {"q_proj": "attention.lora_wq", "k_proj": "attention.lora_wk", "v_proj": "attention.lora_wv",
                "o_proj": "attention.lora_wo", "gate_proj": "feed_forward.lora_w1",
                "down_proj": "feed_forward.lora_w2", "up_proj": "feed_forward.lora_w3"}


class LlamaAdapterV2DecoderLayer(MultimodalDecoderLayer):
    """LLaMA-Adapter V2 block (docs/methods.md, LLaMA-Adapter V2). Layers with prompts compute

        O = softmax(QK^T/sqrt(d) + M) V + tanh(g) * softmax(Q K_p^T/sqrt(d)) V_p,
        K_p, V_p = knorm((P_l + Vq) W_k + b_k), (P_l + Vq) W_v + b_v   (the base's key and value path: frozen
                   projections with the family's biases and key norm, no RoPE)

    in one gated-attention call; layers without prompts are the plain block (with tuned biases / norms).
    ``pill_bias`` holds the tuned biases of projections that already had a pretrained one (which stays frozen).
    """

    def pill_init(self, config, adapter_config: LlamaAdapterV2Config, has_prompt: bool) -> None:
        self.pill_has_prompt = has_prompt
        self.pill_bias = nn.ParameterDict()  # filled by inject_llama_adapter_v2 (bias tuning)
        if has_prompt:
            self.pill_prompt = nn.Parameter(torch.randn(adapter_config.prompt_len, config.hidden_size))
            self.pill_prompt_gate = nn.Parameter(torch.zeros(config.num_attention_heads))
            if adapter_config.new_gate:
                self.pill_new_gate = nn.Parameter(torch.ones(1))
        self.pill_lora = None
        if adapter_config.lora_rank:
            projections = {**{n: getattr(self.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                           **{n: getattr(self.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")}}
            self.pill_lora = nn.ModuleDict({
                name: LowRankDelta(p.in_features, p.out_features, adapter_config.lora_rank)
                for name, p in projections.items()})

    def _project(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A frozen projection plus its tuned bias where that is held apart from a pretrained one, and its LoRA
        delta (V2.1)."""
        out = _frozen_projection(module, x)
        if name in self.pill_bias:
            out = out + self.pill_bias[name].to(out.dtype)
        if self.pill_lora is not None:
            out = out + self.pill_lora[name](x).to(out.dtype)
        return out

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The MLP's own call unless a projection needs more: a LoRA delta, a tuned bias beside a pretrained one,
        # or a quantized projection's tuned bias (`_frozen_projection`).
        if (self.pill_lora is None and not any(name in self.pill_bias for name in _FFN_PROJECTIONS)
                and self.mlp.gate_proj.weight.is_floating_point()):
            return super()._feed_forward(hidden_states)
        mlp = self.mlp
        x = self.post_attention_layernorm(hidden_states)
        product = mlp.act_fn(self._project("gate_proj", mlp.gate_proj, x)) * self._project("up_proj", mlp.up_proj, x)
        return hidden_states + self._project("down_proj", mlp.down_proj, product)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        cache = take_cache(kwargs, past_key_values)
        mm = pop_multimodal(kwargs)
        residual = hidden_states
        x = self.input_layernorm(hidden_states)
        q, k, v = self._qkv(x)
        q, k, v = self._rope_and_cache(q, k, v.transpose(1, 2), position_embeddings, cache)
        if self.pill_has_prompt:
            attn = self.self_attn
            batch = q.shape[0]
            prompt, prompt_segment_ids = self._prompts(x.dtype, batch, mm)
            # Under the autocast of a half-precision base (pill.set_compute_dtype) the tuned fp32 norm gives fp32 x
            # while the projections give half precision: the attention inputs all follow q.
            # The prompts' keys and values come from the base's frozen key and value path (projection with the
            # family's bias, Qwen3's key norm; no LoRA, no RoPE), as the seed's from its frozen wk, wv.
            prompt_k = attn.k_proj(prompt).view(batch, prompt.shape[1], -1, attn.head_dim)
            prompt_k = self.family.key_norm(attn, prompt_k).transpose(1, 2).to(q.dtype)
            prompt_v = attn.v_proj(prompt).view(batch, prompt.shape[1], -1, attn.head_dim).transpose(1, 2).to(q.dtype)
            if hasattr(self, "pill_new_gate"):  # V2.1 scales the whole prompt branch, which is linear in V_p
                prompt_v = prompt_v * self.pill_new_gate.to(prompt_v.dtype)
            structure = attention_structure(attention_mask, mm["mm_sequence_ids"], batch, k.shape[2],
                                            self.attention_window)
            if prompt_segment_ids is not None:
                structure["prompt_segment_ids"] = prompt_segment_ids
            with self._attention_precision(q) as cast:
                attn_out = pk.gated_attention(
                    cast(q), cast(k), cast(v), prompt_k=cast(prompt_k), prompt_v=cast(prompt_v),
                    prompt_gate=cast(self.pill_prompt_gate.to(q.dtype)),
                    scale=attn.scaling, backend=self.kernel_backend, **structure)
            attn_out = attn_out.to(q.dtype).transpose(1, 2)
            attn_out = attn_out.reshape(*attn_out.shape[:2], -1)
        else:
            attn_out = self._standard_attention(q, k, v, attention_mask, kwargs)
        h = residual + self._project("o_proj", self.self_attn.o_proj, attn_out)
        return self._feed_forward(h)

    def _prompts(self, dtype, batch: int, mm: dict):
        """The layer's prompts plus the visual prompts: [B, K, D] (one example per row), or in packed rows
        [B, G*K, D], one block of K per example of the row, with the example of each prompt [B, G*K]."""
        visual = mm["mm_visual_prompts"]
        slots = mm["mm_prompt_sequence_ids"]
        if slots is None:
            prompt = self.pill_prompt.to(dtype).unsqueeze(0).expand(batch, -1, -1)
            return (prompt if visual is None else prompt + visual.to(dtype)), None
        num_prompts = self.pill_prompt.shape[0]
        prompt = self.pill_prompt.to(dtype)[None, None].expand(batch, slots.shape[1], -1, -1)
        if visual is not None:
            prompt = prompt + visual.to(dtype)
        return prompt.reshape(batch, -1, prompt.shape[-1]), slots.repeat_interleave(num_prompts, dim=1)


register_family_layers(LlamaAdapterV2DecoderLayer)


class LlamaAdapterV2Multimodal(MultimodalAdapter):
    method = "llama_adapter_v2"

    def __init__(self, config: LlamaAdapterV2Config, vision_dim: int, hidden_size: int):
        super().__init__(config, vision_dim, None)
        self.projector = VisualPromptProjector(vision_dim, hidden_size, config.prompt_len, config.visual_blocks,
                                               config.visual_heads, config.visual_query_std)
        self.tuned_bias_names: list[str] = []

    def embed(self, model, input_ids, image_features):
        return model.get_input_embeddings()(input_ids), None

    def layer_kwargs(self, model, mm_token_type_ids, image_features, extra, cache) -> dict:
        prompts = extra.get("visual_prompts")
        if prompts is None and image_features is not None:
            prompts = self.visual_prompts(image_features, extra.get("sequence_modality"))
        sequence_ids = extra.get("sequence_ids")
        if sequence_ids is None:
            return {"mm_visual_prompts": prompts}
        # Packed rows: each example of a row gets its own block of prompts, which only its tokens see.
        slots = row_examples(sequence_ids)
        if prompts is not None:
            count = number_of_examples(sequence_ids)
            if prompts.shape[0] != count:
                raise ValueError(f"with sequence_ids, LLaMA-Adapter V2 takes one image (or visual prompt) per "
                                 f"example: {count} examples, got {prompts.shape[0]}")
            prompts = prompts[slots.clamp(min=0)]
        return {"mm_visual_prompts": prompts, "mm_prompt_sequence_ids": slots}

    def generate_inputs(self, model, input_ids, image_features, kwargs: dict) -> dict:
        """The visual prompts [B, K, D], computed once from the image and used by every decoding step."""
        if kwargs.get("mm_token_type_ids") is not None:
            raise ValueError("LLaMA-Adapter V2 takes no mm_token_type_ids: its image enters through the prompts")
        if image_features is None:
            return {}
        return {"visual_prompts": self.visual_prompts(image_features, kwargs.get("sequence_modality"))}

    def visual_prompts(self, image_features: torch.Tensor, sequence_modality: torch.Tensor | None = None):
        if image_features.dim() != 3 or image_features.shape[-1] != self.vision_dim:
            raise ValueError(f"image_features must have shape [B, tokens, C={self.vision_dim}] (one image per "
                             f"sequence for LLaMA-Adapter V2), got {tuple(image_features.shape)}")
        prompts = self.project(image_features)
        if sequence_modality is not None:  # text-only rows get no visual prompt
            prompts = prompts * sequence_modality.to(prompts.dtype)[:, None, None]
        return prompts

    def stage_parameters(self, model, stage: int) -> dict[str, nn.Parameter]:
        # V2.1's additions and the biases held beside pretrained ones train with the biases and norms.
        fine_tuned = (".pill_lora.", ".pill_new_gate", ".pill_bias.")
        if stage == 1:  # gates, visual projector, adaption prompts (the seed's pretrain phase)
            return parameters_where(model, lambda n: n.startswith("multimodal.") or (
                ".pill_" in n and not any(part in n for part in fine_tuned)))
        tuned = set(self.tuned_bias_names)
        return parameters_where(model, lambda n: n in tuned or any(part in n for part in fine_tuned) or (
            self.config.norm_tuning and is_tuned_norm(n)))


# The RMSNorms norm tuning trains: the residual stream's (the seed's attention_norm, ffn_norm and final norm).
# Qwen3's per-head q_norm / k_norm stay frozen: they set each head's query / key scale, which the prompt keys
# share (docs/methods.md, "Base model families").
_TUNED_LAYER_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight")
_FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The projections bias tuning gives a zero-init bias (the seed's wq, wo, w1, w3, w2).
_TUNED_BIAS_PROJECTIONS = ("q_proj", "o_proj") + _FFN_PROJECTIONS


def is_tuned_norm(name: str) -> bool:
    return name == "model.norm.weight" or (name.startswith("model.layers.") and name.endswith(_TUNED_LAYER_NORMS))


def _frozen_projection(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x). A quantized projection (bitsandbytes' 4-bit layer) casts its bias in place to its compute
    dtype, which would turn the tuned fp32 bias into a bf16 parameter under a bf16 base: there the bias is held
    out of the layer's call and added here."""
    bias = module.bias
    if bias is None or module.weight.is_floating_point():
        return module(x)
    module.bias = None
    try:
        out = module(x)
    finally:
        module.bias = bias
    return out + bias.to(out.dtype)


def inject_llama_adapter_v2(model, config: LlamaAdapterV2Config | None = None, *, vision_dim: int,
                            vision_encoder=None) -> MultimodalCausalLM:
    """Add LLaMA-Adapter V2 to `model` (a transformers CausalLM of a supported family, `pill.families`) in
    place: gated adaption prompts in the last layers with visual features added, zero-init biases (bias tuning)
    and trainable norms; returns the model.

    A projection without a bias gets its tuned bias as its own ``bias`` (the seed's layout); one with a
    pretrained bias (Qwen2's q_proj, a base with ``attention_bias`` or ``mlp_bias``) keeps it frozen and gets
    the tuned one beside it, in the layer's ``pill_bias``: the method adds new zero-init biases, it does not
    fine-tune the base's."""
    config = config or LlamaAdapterV2Config()
    family = check_base(model)
    check_vision_dim(vision_dim)
    hc = model.config
    prompt_layers = config.prompt_layers if config.prompt_layers is not None else max(hc.num_hidden_layers - 1, 1)
    if prompt_layers > hc.num_hidden_layers:
        raise ValueError(f"LlamaAdapterV2Config.prompt_layers ({prompt_layers}) exceeds the model's "
                         f"{hc.num_hidden_layers} layers")
    first_prompted = hc.num_hidden_layers - prompt_layers
    swap_layers(model, LlamaAdapterV2DecoderLayer, family,
                lambda i, layer: layer.pill_init(hc, config, i >= first_prompted))
    multimodal = LlamaAdapterV2Multimodal(config, vision_dim, hc.hidden_size)
    if config.bias_tuning:
        for index, layer in enumerate(model.model.layers):
            for leaf in _TUNED_BIAS_PROJECTIONS:
                parent = "mlp" if leaf in _FFN_PROJECTIONS else "self_attn"
                module = getattr(getattr(layer, parent), leaf)
                # A quantized base's weights are packed integers: its tuned biases are fp32 parameters of their
                # own beside them.
                dtype = module.weight.dtype if module.weight.is_floating_point() else torch.float32
                bias = nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=module.weight.device))
                if module.bias is None:
                    module.bias = bias
                    multimodal.tuned_bias_names.append(f"model.layers.{index}.{parent}.{leaf}.bias")
                else:
                    layer.pill_bias[leaf] = bias
    return attach_method(model, family, multimodal, vision_encoder)


# ----------------------------------------------------------------------------------------------------------
# The seed's released checkpoints
# ----------------------------------------------------------------------------------------------------------

# timm's Block (the seed's visual blocks) -> nn.TransformerEncoderLayer(norm_first=True, gelu): same equations,
# qkv stacked in the same q, k, v order.
_SEED_VISUAL_BLOCK = {"norm1": "norm1", "attn.qkv": "self_attn.in_proj", "attn.proj": "self_attn.out_proj",
                      "norm2": "norm2", "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
# The seed's tuned biases and norms per layer (Meta names) -> transformers' names.
_SEED_LAYER_BIASES = {"attention.wq.bias": "self_attn.q_proj.bias", "attention.wo.bias": "self_attn.o_proj.bias",
                      "feed_forward.w1.bias": "mlp.gate_proj.bias", "feed_forward.w3.bias": "mlp.up_proj.bias",
                      "feed_forward.w2.bias": "mlp.down_proj.bias"}
_SEED_LAYER_NORMS = {"attention_norm.weight": "input_layernorm.weight",
                     "ffn_norm.weight": "post_attention_layernorm.weight"}
# Output rows of these LoRA up-projections live in q / k space: Meta's RoPE order, permuted as wq / wk are.
_SEED_LORA_ROPE_ROWS = ("q_proj", "k_proj")


def convert_seed_checkpoint(keys: SeedKeys, base, overrides: dict, image_token_id: int | None) -> SeedConversion:
    """A released LLaMA-Adapter V2 multimodal checkpoint (BIAS-7B, CAPTION-7B, LORA-BIAS-7B, LORA-BIAS-7B-v21)
    as this project's adapter.

    Mapping: the CLIP projection, its norm, the learned visual queries, the timm visual blocks and the output
    projection and norm onto `VisualPromptProjector`; ``adapter_query`` [layers x K, D] onto each prompted
    layer's prompt (the last `layers` layers, in order); each prompted layer's ``attention.gate`` [1, H, 1, 1]
    onto its per-head gate (layer 0's, which the seed never uses, is dropped); the tuned biases and norms onto
    transformers' names, with ``wq.bias`` permuted from Meta's interleaved RoPE order into transformers' (as
    transformers' converter does with ``wq``). V2.1's LoRA pairs ``lora_w*_l1`` / ``_l2`` become each projection's
    A / B (the rows of the q and k up-projections permuted likewise), its ``new_gate`` the prompt branch's scalar
    gate. The number of visual heads cannot be read off the shapes: the seed's 16 unless ``visual_heads`` is
    given."""
    hidden, layers, heads = base.hidden_size, base.num_hidden_layers, base.num_attention_heads
    ffn = base.intermediate_size
    # The seeds' LLaMA-1/2-7B have as many key/value heads as query heads; a GQA base narrows k and v.
    kv_heads = getattr(base, "num_key_value_heads", None) or heads
    kv_width = kv_heads * (getattr(base, "head_dim", None) or hidden // heads)
    lora = keys.shape("llama.layers.0.attention.lora_wq_l1.weight")
    new_gate = bool(keys.matching(r"llama\.layers\.\d+\.attention\.new_gate"))
    queries = keys.shape("visual_query.weight")
    prompt_len, vision_dim = queries if queries else (10, 768)
    blocks = len(layer_indices(keys, r"visual_blocks\.(\d+)\..*"))
    prompts = keys.shape("adapter_query.weight")
    prompt_rows = prompts[0] if prompts else prompt_len * (layers - 1)
    if prompt_rows % prompt_len or not 0 < prompt_rows // prompt_len <= layers:
        raise SeedCheckpointError(f"{keys.where}: adapter_query.weight has {prompt_rows} rows, not a multiple of "
                                  f"the {prompt_len} visual queries for at most {layers} layers")
    prompt_layers = prompt_rows // prompt_len
    settings = {"prompt_len": prompt_len, "visual_blocks": blocks, "visual_heads": 16, "bias_tuning": True,
                "norm_tuning": True, "prompt_layers": None if prompt_layers == layers - 1 else prompt_layers,
                "lora_rank": lora[0] if lora else 0, "new_gate": new_gate}
    config = build_method_config(LlamaAdapterV2Config, settings, overrides, keys.where)
    tensors = AdapterTensors()
    put = tensors.put

    projector = "multimodal.projector"
    for seed_name, ours in (("clip_proj", "clip_proj"), ("clip_proj_norm", "clip_norm")):
        width = (vision_dim, vision_dim) if seed_name == "clip_proj" else (vision_dim,)
        put(f"{projector}.{ours}.weight", keys.take(f"{seed_name}.weight", width))
        put(f"{projector}.{ours}.bias", keys.take(f"{seed_name}.bias", (vision_dim,)))
    put(f"{projector}.queries", keys.take("visual_query.weight", (prompt_len, vision_dim)))
    block_shapes = {"norm1": (vision_dim,), "attn.qkv": (3 * vision_dim, vision_dim), "attn.proj":
                    (vision_dim, vision_dim), "norm2": (vision_dim,), "mlp.fc1": (4 * vision_dim, vision_dim),
                    "mlp.fc2": (vision_dim, 4 * vision_dim)}
    for b in range(blocks):
        for seed_name, ours in _SEED_VISUAL_BLOCK.items():
            weight = keys.take(f"visual_blocks.{b}.{seed_name}.weight", block_shapes[seed_name])
            bias = keys.take(f"visual_blocks.{b}.{seed_name}.bias", (block_shapes[seed_name][0],))
            if ours == "self_attn.in_proj":
                put(f"{projector}.blocks.{b}.self_attn.in_proj_weight", weight)
                put(f"{projector}.blocks.{b}.self_attn.in_proj_bias", bias)
            else:
                put(f"{projector}.blocks.{b}.{ours}.weight", weight)
                put(f"{projector}.blocks.{b}.{ours}.bias", bias)
    put(f"{projector}.out_proj.weight", keys.take("visual_proj.weight", (hidden, vision_dim)))
    put(f"{projector}.out_proj.bias", keys.take("visual_proj.bias", (hidden,)))
    put(f"{projector}.out_norm.weight", keys.take("visual_proj_norm.weight", (hidden,)))
    put(f"{projector}.out_norm.bias", keys.take("visual_proj_norm.bias", (hidden,)))
    adapter_query = keys.take("adapter_query.weight", (prompt_rows, hidden))
    first_prompted = layers - prompt_layers
    for i in range(layers):
        layer = f"llama.layers.{i}"
        ours = f"model.layers.{i}"
        if i >= first_prompted:
            if adapter_query is not None:
                j = i - first_prompted
                put(f"{ours}.pill_prompt", adapter_query[j * prompt_len:(j + 1) * prompt_len])
            gate = keys.take(f"{layer}.attention.gate", (1, heads, 1, 1))
            put(f"{ours}.pill_prompt_gate", None if gate is None else gate.reshape(heads))
            if config.new_gate:
                gate = keys.take(f"{layer}.attention.new_gate", (1, 1, 1, 1))
                put(f"{ours}.pill_new_gate", None if gate is None else gate.reshape(1))
        else:  # the seed creates the gates in every layer and uses them in prompted ones only
            for unused in ("gate", "new_gate"):
                if keys.has(f"{layer}.attention.{unused}"):
                    keys.skip(f"{layer}.attention.{unused}")
        if config.lora_rank:
            r = config.lora_rank
            for name, seed_name in LORA_TARGETS.items():
                in_width = ffn if name == "down_proj" else hidden
                out_width = {"gate_proj": ffn, "up_proj": ffn, "k_proj": kv_width, "v_proj": kv_width}.get(name, hidden)
                put(f"{ours}.pill_lora.{name}.lora_a", keys.take(f"{layer}.{seed_name}_l1.weight", (r, in_width)))
                up = keys.take(f"{layer}.{seed_name}_l2.weight", (out_width, r))
                if up is not None and name in _SEED_LORA_ROPE_ROWS:
                    up = rope_rows_to_hf(up, heads if name == "q_proj" else kv_heads)
                put(f"{ours}.pill_lora.{name}.lora_b", up)
        for seed_name, name in _SEED_LAYER_BIASES.items():
            width = ffn if seed_name in ("feed_forward.w1.bias", "feed_forward.w3.bias") else hidden
            bias = keys.take(f"{layer}.{seed_name}", (width,))
            if bias is not None and seed_name == "attention.wq.bias":
                bias = rope_rows_to_hf(bias, heads)
            put(f"{ours}.{name}", bias)
        for seed_name, name in _SEED_LAYER_NORMS.items():
            put(f"{ours}.{name}", keys.take(f"{layer}.{seed_name}", (hidden,)))
    put("model.norm.weight", keys.take("llama.norm.weight", (hidden,)))
    keys.finish()
    notes = [f"{prompt_layers} prompted layers x {prompt_len} prompts, {blocks} visual blocks of "
             f"{config.visual_heads} heads (not in the file: the seed's 16 unless visual_heads is given), vision "
             f"width {vision_dim} (CLIP ViT-L/14: all 257 tokens after post_layernorm and the projection)"]
    if config.lora_rank:
        notes.append(f"LLaMA-Adapter V2.1: LoRA rank {config.lora_rank} on q, k, v, o and the FFN"
                     + (", new_gate" if config.new_gate else ""))
    return SeedConversion(config, vision_dim, None, tensors, notes)


def _inject_from_registry(model, config=None, *, vision_dim: int, image_token_id=None, vision_encoder=None):
    if image_token_id is not None:
        raise ValueError("LLaMA-Adapter V2 takes no image_token_id: its images enter through the visual prompts")
    return inject_llama_adapter_v2(model, config, vision_dim=vision_dim, vision_encoder=vision_encoder)


METHOD = Method(
    name="llama_adapter_v2", config_class=LlamaAdapterV2Config, inject=_inject_from_registry,
    image_placeholders=False,
    # One visual block of 8 heads fits the demo's CPU budget (the seed: 8 blocks of 16 heads on CLIP ViT-L). Small
    # visual queries let the 4 image tokens dominate the visual prompts from the start (the seed's unit-variance
    # queries leave them 99% image-independent at initialisation).
    demo_config={"visual_blocks": 1, "visual_heads": 8, "visual_query_std": 0.02},
    # The image reaches the answer only through the visual prompts, and stage 2 cannot touch them, so the budget
    # goes to stage 1; stage 2 learns the answer format. The visual block and the image projection train at a
    # tenth of the lr: at the full lr, caption training erased the digit information the untrained block passes
    # on (a linear probe on the visual prompts fell from 89% to 71% held-out in 280 steps). docs/demo.md has the
    # runs behind these settings.
    demo_settings={"stage1_lr": 2e-3, "stage2_lr": 2e-3, "stage1_steps": 240, "stage2_steps": 40,
                   "stage1_lr_scale": {"projector.blocks": 0.1, "projector.clip_": 0.1}},
    convert_seed=convert_seed_checkpoint,
    vllm_refusal=lambda config: ("its gated attention over per-request visual prompts is a second attention in "
                                 "the last layers, which vLLM's paged attention has no place for"),
)
