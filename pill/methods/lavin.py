"""LaVIN (docs/methods.md, LaVIN): mixture-of-modality adaptation, a soft-routed RepAdapter before attention in
every layer, routed per sequence from a learned modality token, trained in one stage. Its whole definition:
config, adapter module, decoder layer, model-level module, inject function, stage parameters and registry
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
from ..packing import number_of_examples, per_example_any
from ..seed_format import (AdapterTensors, SeedCheckpointError, SeedConversion, SeedKeys, build_method_config,
                           layer_indices)
from .base import (Method, MethodConfig, MLPProjector, MultimodalAdapter, MultimodalDecoderLayer, check_vision_dim,
                   parameters_where, pop_multimodal, register_family_layers, rms_norm_args, swap_layers)


@dataclass
class LavinConfig(MethodConfig):
    """LaVIN's mixture-of-modality adaptation: a soft-routed RepAdapter before attention in every layer.

    adapter_dim: bottleneck (seed: 8); groups: groups of the up-projection 1x1 convolutions (seed: 2);
    num_experts: up-projection experts (seed: 2); scale: s (seed: 1); temperature: router softmax
    temperature (seed: 10 for 7B, 5 for 13B); dropout: on the bottleneck in training (seed: 0.1);
    projector_hidden: width of the image-feature MLP (seed: 128); vision_router_blocks: the first N blocks of a
    transformers vision tower (`vision: {type: hf}`) get a soft-routed adapter on their attention input, with
    the LLM side's bottleneck, groups, scale and temperature (the seed: all 24 blocks of CLIP ViT-L/14), routed
    per token (the seed's batch-1 behaviour; docs/methods.md, LaVIN), trained jointly: the model then encodes
    the images itself, inside the training graph (`takes_pixels`); backend: kernel backend of the fused ops at
    injection (run-time only; see `MethodConfig`).
    """

    method: ClassVar[str] = "lavin"
    stages: ClassVar[tuple[int, ...]] = (1,)

    adapter_dim: int = 8
    groups: int = 2
    num_experts: int = 2
    scale: float = 1.0
    temperature: float = 10.0
    dropout: float = 0.1
    projector_hidden: int = 128
    vision_router_blocks: int = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        self._positive(adapter_dim=self.adapter_dim, groups=self.groups, num_experts=self.num_experts,
                       projector_hidden=self.projector_hidden)
        if not isinstance(self.vision_router_blocks, int) or isinstance(self.vision_router_blocks, bool) or \
                self.vision_router_blocks < 0:
            raise ValueError(f"LavinConfig.vision_router_blocks must be a non-negative integer, got "
                             f"{self.vision_router_blocks!r}")
        if self.adapter_dim % self.groups:
            raise ValueError(f"LavinConfig.adapter_dim ({self.adapter_dim}) must be a multiple of groups "
                             f"({self.groups})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LavinConfig.dropout must lie in [0, 1), got {self.dropout}")
        if self.temperature <= 0:
            raise ValueError(f"LavinConfig.temperature must be positive, got {self.temperature}")
        self._check_backend()


class SoftRoutedAdapter(nn.Module):
    """LaVIN's RepAdapter router: shared down-projection, E grouped up-projection experts, per-sequence softmax
    routing from the modality token. Initialisation as the seed: xavier down, zero up, nn.Linear router."""

    def __init__(self, hidden_size: int, adapter_dim: int, groups: int, num_experts: int, scale: float,
                 temperature: float, dropout: float, kernel_backend: str | None = None):
        super().__init__()
        if hidden_size % groups:
            raise ValueError(f"LaVIN: hidden size {hidden_size} must be a multiple of groups {groups}")
        self.groups, self.scale, self.temperature, self.dropout = groups, scale, temperature, dropout
        self.kernel_backend = kernel_backend
        self.w_down = nn.Parameter(torch.empty(hidden_size, adapter_dim))
        nn.init.xavier_uniform_(self.w_down)
        self.b_down = nn.Parameter(torch.zeros(adapter_dim))
        # Conv1d(r, D, 1, groups) weights of each expert: [E, D, r / groups].
        self.w_up_grouped = nn.Parameter(torch.zeros(num_experts, hidden_size, adapter_dim // groups))
        self.b_up = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.router = nn.Linear(hidden_size, num_experts)

    def dense_up(self) -> torch.Tensor:
        """The grouped 1x1 convolutions as block-diagonal [E, r, D] matrices."""
        num_experts, hidden, per_group = self.w_up_grouped.shape
        out_per_group = hidden // self.groups
        return torch.stack([
            torch.block_diag(*[self.w_up_grouped[e, g * out_per_group:(g + 1) * out_per_group].t()
                               for g in range(self.groups)])
            for e in range(num_experts)])

    def routing_weights(self, normed_modality_token: torch.Tensor) -> torch.Tensor:
        logits = F.linear(normed_modality_token, self.router.weight.to(normed_modality_token.dtype),
                          self.router.bias.to(normed_modality_token.dtype))
        return torch.softmax(logits / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor, norm: nn.Module | None = None):
        """x [B, S, D] (or [B, D]); routing_weights [B, E], one row per sequence, or [B, S, E], one per token
        (packed rows, whose tokens belong to several examples)."""
        dtype = x.dtype
        token_weights = routing_weights.to(dtype).unsqueeze(-2).expand(*x.shape[:-1], routing_weights.shape[-1]) \
            if x.dim() == 3 and routing_weights.dim() == 2 else routing_weights.to(dtype)
        dropout_mask = None
        if self.training and self.dropout > 0:
            keep = torch.rand(*x.shape[:-1], self.w_down.shape[1], device=x.device) >= self.dropout
            dropout_mask = keep.to(dtype) / (1.0 - self.dropout)
        return pk.soft_routed_adapter(x, self.w_down.to(dtype), self.b_down.to(dtype), self.dense_up().to(dtype),
                                      self.b_up.to(dtype), token_weights, dropout_mask=dropout_mask,
                                      scale=self.scale, backend=self.kernel_backend, **rms_norm_args(norm, dtype))


class LavinDecoderLayer(MultimodalDecoderLayer):
    """LaVIN block (docs/methods.md, LaVIN; the seed's adapter_type='attn'):

        a = n + s * sum_e w_e (z W_up_e + b_e),  z = drop(n W_down + b),  n = RMSNorm_att(x)   (one fused call)
        h = x + Attn(a);  y = h + FFN(RMSNorm_ffn(h))

    ``w`` comes per sequence from the modality token's state at this layer (see `modality_token_step`).
    """

    def pill_init(self, config, lavin_config: LavinConfig) -> None:
        self.pill_router_adapter = SoftRoutedAdapter(
            config.hidden_size, lavin_config.adapter_dim, lavin_config.groups, lavin_config.num_experts,
            lavin_config.scale, lavin_config.temperature, lavin_config.dropout)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        cache = take_cache(kwargs, past_key_values)
        mm = pop_multimodal(kwargs)
        routing = mm["mm_routing_weights"]
        if routing is None:
            raise ValueError("LaVIN layers need mm_routing_weights; call the injected model, not its layers")
        residual = hidden_states
        # [B, L, E] per sequence, or [B, S, L, E] per token in packed rows
        layer_routing = routing[:, self.self_attn.layer_idx] if routing.dim() == 3 else \
            routing[:, :, self.self_attn.layer_idx]
        a = self.pill_router_adapter(hidden_states, layer_routing, norm=self.input_layernorm)
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


register_family_layers(LavinDecoderLayer)


class LavinMultimodal(MultimodalAdapter):
    method = "lavin"

    def __init__(self, config: LavinConfig, vision_dim: int, hidden_size: int, image_token_id: int):
        super().__init__(config, vision_dim, image_token_id)
        self.projector = MLPProjector(vision_dim, config.projector_hidden, hidden_size)
        # The seed's adapter_modality_embedding: nn.Embedding(2, D), N(0, 1).
        self.modality_embedding = nn.Parameter(torch.randn(2, hidden_size))
        # Inside the vision tower, at its width (the features' width, one CLS token per block).
        self.vision_routers = nn.ModuleList([
            SoftRoutedAdapter(vision_dim, config.adapter_dim, config.groups, config.num_experts, config.scale,
                              config.temperature, config.dropout) for _ in range(config.vision_router_blocks)])

    def feature_encoder(self, encoder):
        if not len(self.vision_routers):
            return encoder
        return RoutedVisionEncoder(encoder, self.vision_routers)

    def layer_kwargs(self, model, mm_token_type_ids, image_features, extra, cache) -> dict:
        sequence_modality = extra.get("sequence_modality")
        sequence_ids = extra.get("sequence_ids")
        if sequence_ids is not None:  # packed rows: route each example by its own modality, token by token
            count = number_of_examples(sequence_ids)
            if sequence_modality is None:
                sequence_modality = per_example_any(sequence_ids, mm_token_type_ids, count)
            elif tuple(sequence_modality.shape) != (count,):
                raise ValueError(f"with sequence_ids, sequence_modality holds one entry per example: shape "
                                 f"[{count}], got {tuple(sequence_modality.shape)}")
            weights = self.routing_weights(model, sequence_modality.to(sequence_ids.device))
            return {"mm_routing_weights": weights[sequence_ids.clamp(min=0)]}
        if sequence_modality is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("LaVIN routes per sequence from the prompt's modality: when decoding with a cache, "
                                 "pass sequence_modality [B] (1 where the sequence has an image); generate() does")
            batch = extra["batch"]
            sequence_modality = (mm_token_type_ids.any(dim=-1) if mm_token_type_ids is not None else
                                 torch.zeros(batch, dtype=torch.bool, device=self.modality_embedding.device))
        return {"mm_routing_weights": self.routing_weights(model, sequence_modality)}

    def generate_inputs(self, model, input_ids, image_features, kwargs: dict) -> dict:
        inputs = super().generate_inputs(model, input_ids, image_features, kwargs)
        if kwargs.get("sequence_modality") is None:  # decoding steps are text: fix the routing from the prompt
            inputs["sequence_modality"] = inputs["prompt_mm_token_type_ids"].bool().any(dim=-1)
        return inputs

    def routing_weights(self, model, sequence_modality: torch.Tensor) -> torch.Tensor:
        """[B, L, E] routing weights of every layer from each sequence's modality token."""
        dtype = model.get_input_embeddings().weight.dtype
        state = self.modality_embedding[sequence_modality.to(torch.long)].to(dtype)
        weights = []
        for layer in model.model.layers:
            w, state = layer.modality_token_step(state)
            weights.append(w)
        return torch.stack(weights, dim=1)

    def stage_parameters(self, model, stage: int) -> dict[str, nn.Parameter]:
        return parameters_where(model, lambda n: n.startswith("multimodal.") or ".pill_" in n)

    @property
    def takes_pixels(self) -> bool:
        return len(self.vision_routers) > 0

    def encode_images(self, images) -> torch.Tensor:
        """Without vision routers, the frozen encoder's features (no gradient). With them, the tower runs here,
        inside the graph: gradients reach the routers, whose bottleneck dropout follows their training mode."""
        if not self.takes_pixels:
            return super().encode_images(images)
        if self.vision_encoder is None:
            raise ValueError("images given but the model has no vision encoder: LaVIN's vision routers need the "
                             "vision tower (pass vision_encoder= to inject_lavin or set_vision_encoder)")
        return self.vision_encoder.run_routed(images)


class RoutedVisionEncoder:
    """A transformers vision encoder (`pill.vision.HFVisionEncoder`) with LaVIN's routers in its first blocks:
    ``x + Attn(R(LN(x)))``, ``R(n) = n + s * sum_e w_e(n) (z W_up_e + b_e)``, ``z = n W_down + b``, the weights
    ``w(n) = softmax((n W_r + b_r) / T)`` per token. The seed computes them from ``n[:, 0]`` in CLIP's
    sequence-first layout, which is each token's own state for a batch of one image and image 0's for every
    image of a larger batch; per token is the batch-1 behaviour, which does not depend on the batch.
    Its cache key names the routers' weights, so cached features follow the adapter."""

    def __init__(self, encoder, routers: nn.ModuleList):
        if not hasattr(encoder, "run_with_block_adapters"):
            raise TypeError(f"LaVIN's vision routers run inside a transformers vision tower (vision: {{type: hf, "
                            f"...}}); got a {type(encoder).__name__}")
        self.encoder, self.routers = encoder, routers
        for name in ("feature_dim", "num_tokens", "batch_size", "preprocess"):
            if hasattr(encoder, name):
                setattr(self, name, getattr(encoder, name))

    @property
    def key(self) -> str:
        import hashlib

        digest = hashlib.sha1()
        for p in self.routers.parameters():
            digest.update(p.detach().float().cpu().numpy().tobytes())
        return f"{self.encoder.key}-lavin-routers-{digest.hexdigest()[:12]}"

    def _route(self, index: int):
        router = self.routers[index]

        def apply(normed: torch.Tensor) -> torch.Tensor:
            weights = router.routing_weights(normed.to(router.w_down.dtype))
            return router(normed.to(router.w_down.dtype), weights).to(normed.dtype)
        return apply

    def run_routed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The features in the current grad mode and the routers' own training mode (training: gradients
        reach them, dropout on)."""
        return self.encoder.run_with_block_adapters(pixels, [self._route(i) for i in range(len(self.routers))])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        modes = [m.training for m in self.routers]
        self.routers.eval()  # encoding for evaluation: no bottleneck dropout
        try:
            with torch.no_grad():
                return self.run_routed(pixels)
        finally:
            for module, mode in zip(self.routers, modes):
                module.train(mode)

    def encode(self, images) -> torch.Tensor:
        from ..vision import encode_in_batches

        return encode_in_batches(self, images)


def inject_lavin(model, config: LavinConfig | None = None, *, vision_dim: int, image_token_id: int,
                 vision_encoder=None) -> MultimodalCausalLM:
    """Add LaVIN's mixture-of-modality adapters to `model` (a transformers CausalLM of a supported family,
    `pill.families`) in place; returns the model.

    Routing is soft and per sequence, from a learned modality token that attends only to itself (as in the
    seed), so a sequence's output never depends on the rest of the batch.
    """
    config = config or LavinConfig()
    family = check_base(model)
    check_vision_dim(vision_dim)
    hc = model.config
    swap_layers(model, LavinDecoderLayer, family, lambda i, layer: layer.pill_init(hc, config))
    return attach_method(model, family, LavinMultimodal(config, vision_dim, hc.hidden_size, image_token_id),
                         vision_encoder)


# ----------------------------------------------------------------------------------------------------------
# The seed's released checkpoints
# ----------------------------------------------------------------------------------------------------------

_SEED_VISION_ROUTER_KEYS = r"backbone\.visual\..*adapter.*"
_SEED_VISION_ROUTER_BLOCK = r"backbone\.visual\.transformer\.resblocks\.(\d+)\.adapter_attn\..*"


def _put_router(put, keys: SeedKeys, seed: str, ours: str, width: int, rank: int, groups: int, experts: int) -> None:
    """One RepAdapter_Router (``conv_A`` [r, d, 1] the shared down-projection, transposed; ``conv_B`` /
    ``conv_D`` [d, r / groups, 1] experts 0 and 1, kept grouped; ``expert_weights`` the router) as a
    `SoftRoutedAdapter`'s parameters."""
    put(f"{ours}.w_down", keys.take(f"{seed}.conv_A.weight", (rank, width, 1)), lambda t: t[:, :, 0].t())
    put(f"{ours}.b_down", keys.take(f"{seed}.conv_A.bias", (rank,)))
    ups = [keys.take(f"{seed}.{conv}.weight", (width, rank // groups, 1)) for conv in ("conv_B", "conv_D")]
    biases = [keys.take(f"{seed}.{conv}.bias", (width,)) for conv in ("conv_B", "conv_D")]
    if all(t is not None for t in ups):
        put(f"{ours}.w_up_grouped", torch.stack([t[:, :, 0] for t in ups]))
    if all(t is not None for t in biases):
        put(f"{ours}.b_up", torch.stack(biases))
    put(f"{ours}.router.weight", keys.take(f"{seed}.expert_weights.weight", (experts, width)))
    put(f"{ours}.router.bias", keys.take(f"{seed}.expert_weights.bias", (experts,)))


# The seed's router temperature by LLM width: 10 for LLaMA-7B, 5 for 13B (its model-building code).
_SEED_TEMPERATURE = {4096: 10.0, 5120: 5.0}


def convert_seed_checkpoint(keys: SeedKeys, base, overrides: dict, image_token_id: int | None) -> SeedConversion:
    """LaVIN's training checkpoint (``layers.{i}.adapter_attn.{conv_A,conv_B,conv_D,expert_weights}``,
    ``adapter_proj.{conv_A,conv_B}``, ``adapter_modality_embedding.weight``) as this project's LaVIN adapter.
    conv_A [r, d, 1] is the shared down-projection (transposed to [d, r]); conv_B and conv_D [d, r / groups, 1]
    are experts 0 and 1 of the grouped up-projection, kept grouped; expert_weights is the router. All of it
    acts on the RMSNorm output, so nothing is permuted. The bottleneck and groups are read off the shapes; the
    temperature is the seed's for the LLM's width (10 for 7B, 5 for 13B) unless given. The vision-side routers
    are converted too (``backbone.visual.transformer.resblocks.{i}.adapter_attn``, the same layout at the CLIP
    width, into ``multimodal.vision_routers.{i}``, `vision_router_blocks` set to their count), or dropped with
    ``skip_vision_routers`` in `overrides`."""
    overrides = dict(overrides)
    skip_vision = bool(overrides.pop("skip_vision_routers", False))
    hidden, layers = base.hidden_size, base.num_hidden_layers
    down = keys.shape("layers.0.adapter_attn.conv_A.weight")
    rank = down[0] if down else 8
    up = keys.shape("layers.0.adapter_attn.conv_B.weight")
    groups = rank // up[1] if up and up[1] and rank % up[1] == 0 else 2
    experts = 2
    mlp = keys.shape("adapter_proj.conv_A.weight")
    projector_hidden, vision_dim = mlp if mlp else (128, 1024)
    notes = []
    settings = {"adapter_dim": rank, "groups": groups, "num_experts": experts, "projector_hidden": projector_hidden}
    if "temperature" not in overrides:
        if hidden not in _SEED_TEMPERATURE:
            raise SeedCheckpointError(f"{keys.where}: the seed's router temperature is known for LLaMA-7B and 13B "
                                      f"(width 4096 / 5120); this base is {hidden} wide: give the temperature")
        settings["temperature"] = _SEED_TEMPERATURE[hidden]
        notes.append(f"router temperature {settings['temperature']:g} (the seed's for width {hidden})")
    config = build_method_config(LavinConfig, settings, overrides, keys.where)
    tensors = AdapterTensors()
    put = tensors.put

    for i in range(layers):
        _put_router(put, keys, f"layers.{i}.adapter_attn", f"model.layers.{i}.pill_router_adapter", hidden, rank,
                    groups, experts)
    put("multimodal.projector.fc1.weight", keys.take("adapter_proj.conv_A.weight", (projector_hidden, vision_dim)))
    put("multimodal.projector.fc1.bias", keys.take("adapter_proj.conv_A.bias", (projector_hidden,)))
    put("multimodal.projector.fc2.weight", keys.take("adapter_proj.conv_B.weight", (hidden, projector_hidden)))
    put("multimodal.projector.fc2.bias", keys.take("adapter_proj.conv_B.bias", (hidden,)))
    put("multimodal.modality_embedding", keys.take("adapter_modality_embedding.weight", (2, hidden)))
    vision_routers = keys.matching(_SEED_VISION_ROUTER_KEYS)
    blocks = layer_indices(keys, _SEED_VISION_ROUTER_BLOCK)
    if skip_vision and vision_routers:
        for key in vision_routers:
            keys.skip(key)
        notes.append(f"dropped {len(vision_routers)} vision-side router tensors (skip_vision_routers)")
    elif blocks:
        if blocks != list(range(len(blocks))):
            raise SeedCheckpointError(f"{keys.where}: vision routers in CLIP blocks {blocks}; expected blocks "
                                      f"0..{len(blocks) - 1}")
        config = build_method_config(LavinConfig, {**settings, "vision_router_blocks": len(blocks)}, overrides,
                                     keys.where)
        for i in blocks:
            seed, ours = f"backbone.visual.transformer.resblocks.{i}.adapter_attn", f"multimodal.vision_routers.{i}"
            _put_router(put, keys, seed, ours, vision_dim, rank, groups, experts)
        notes.append(f"vision routers in CLIP blocks 0..{len(blocks) - 1}, routed per token (the seed's batch-1 "
                     f"behaviour); encode with vision: {{type: hf, cls_layers: [4, 8, 12, 16, 20, 24]}}")
    keys.finish()
    return SeedConversion(config, vision_dim, image_token_id if image_token_id is not None else base.vocab_size,
                          tensors, notes)


METHOD = Method(
    name="lavin", config_class=LavinConfig, inject=inject_lavin, image_placeholders=True,
    # The modality token runs every layer's weights before the layers run (the routing weights of all layers
    # come first), outside the layers' forward, where per-layer FSDP units would hold only their shards.
    fsdp_layer_units=False,
    # The seed's learning rate is several times PILL's.
    demo_settings={"stage1_lr": 4e-3, "stage2_lr": 4e-3},
    convert_seed=convert_seed_checkpoint,
    vllm_refusal=lambda config: ("LaVIN routes every layer by the whole request's modality, at every decoding "
                                 "step too, and vLLM hands the model no per-request value at decoding steps"),
)
