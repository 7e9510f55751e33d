"""Injection of PILL, LaVIN and LLaMA-Adapter V2 into an existing transformers LlamaForCausalLM.

`inject_pill(model, PillConfig(), vision_dim=...)` (and `inject_lavin`, `inject_llama_adapter_v2`) modify the
model in place and return it: the decoder layers become the method's layer subclasses (base weights untouched
and frozen), the model becomes a `MultimodalLlamaForCausalLM` whose forward and generate take image features,
and ``model.multimodal`` holds the method's model-level modules (projector, modality token, prompts).

Image features follow the LLaVA convention for PILL and LaVIN: the text holds ``image_token_id`` placeholders
(the id may lie outside the vocabulary), and ``image_features`` [N_images, tokens, C] (the output of any frozen
vision encoder) are projected and scattered into the placeholder positions in order. LLaMA-Adapter V2 adds
visual features to its prompts instead: ``image_features`` [B, tokens, C], one image per sequence.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import LlamaForCausalLM

from .config import LavinConfig, LlamaAdapterV2Config, PillConfig, _MethodConfig
from .hf_compat import CAUSAL_LM_CACHE_ARG, take_cache
from .layers import LavinDecoderLayer, LlamaAdapterV2DecoderLayer, PillDecoderLayer
from .modules import LinearProjector, MLPProjector, VisualPromptProjector


def _check_llama(model) -> None:
    if isinstance(model, MultimodalLlamaForCausalLM):
        raise ValueError(f"this model already has the {model.multimodal.config.method!r} adapters injected")
    if type(model) is not LlamaForCausalLM:
        raise TypeError(f"expected a transformers LlamaForCausalLM, got {type(model).__name__}; PILL, LaVIN and "
                        f"LLaMA-Adapter V2 are implemented for the LLaMA architecture (model_type 'llama')")


def _check_vision_dim(vision_dim: int) -> None:
    if not isinstance(vision_dim, int) or isinstance(vision_dim, bool) or vision_dim <= 0:
        raise ValueError(f"vision_dim must be the positive feature width C of the vision encoder, got {vision_dim!r}")


class MultimodalAdapter(nn.Module):
    """Model-level part of a method: the projector and method-specific state; knows how to prepare inputs."""

    method: str

    def __init__(self, config: _MethodConfig, vision_dim: int, image_token_id: int | None):
        super().__init__()
        self.config = config
        self.vision_dim = vision_dim
        self.image_token_id = image_token_id
        self.stage = config.stages[0]  # training starts at the first stage
        self.vision_encoder = None

    def set_vision_encoder(self, encoder) -> None:
        """A frozen vision encoder: any callable mapping images to features [N, tokens, C=vision_dim]. It is kept
        outside the module tree, so it is neither trained nor saved with the adapter."""
        if encoder is not None and not callable(encoder):
            raise TypeError(f"vision_encoder must be callable (images -> [N, tokens, C]), got "
                            f"{type(encoder).__name__}")
        object.__setattr__(self, "vision_encoder", encoder)

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        if self.vision_encoder is None:
            raise ValueError("images given but the model has no vision encoder: pass vision_encoder= to the inject "
                             "call, or pass image_features instead")
        features = self.vision_encoder(images)
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[-1] != self.vision_dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"the vision encoder must return features [N, tokens, C={self.vision_dim}], got {shape}")
        return features

    # -- inputs --------------------------------------------------------------------------------------------
    def embed(self, model, input_ids: torch.Tensor, image_features: torch.Tensor | None):
        """Token embeddings with projected image features scattered into the placeholders, and the mask."""
        embed_tokens = model.get_input_embeddings()
        if self.image_token_id is None:
            if image_features is not None:
                raise ValueError("image_features given but this model has no image_token_id")
            return embed_tokens(input_ids), None
        placeholders = input_ids == self.image_token_id
        embeds = embed_tokens(input_ids.masked_fill(placeholders, 0))
        count = int(placeholders.sum())
        if image_features is None:
            if count:
                raise ValueError(f"input_ids hold {count} image placeholder tokens (id {self.image_token_id}) but no "
                                 f"image_features were given")
            return embeds, placeholders.long()
        if image_features.dim() != 3 or image_features.shape[-1] != self.vision_dim:
            raise ValueError(f"image_features must have shape [N_images, tokens, C={self.vision_dim}], got "
                             f"{tuple(image_features.shape)}")
        n_images, tokens = image_features.shape[:2]
        if count != n_images * tokens:
            raise ValueError(f"input_ids hold {count} image placeholder tokens but image_features carry "
                             f"{n_images} images x {tokens} tokens = {n_images * tokens}")
        projected = self.project(image_features.to(self.projector_dtype())).to(embeds.dtype)
        embeds = embeds.masked_scatter(placeholders.unsqueeze(-1), projected.reshape(-1, projected.shape[-1]))
        return embeds, placeholders.long()

    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.projector(image_features)

    def layer_kwargs(self, model, mm_token_type_ids, image_features, extra: dict, cache) -> dict:
        return {}

    def generate_inputs(self, model, input_ids, image_features, kwargs: dict) -> dict:
        """Per-row tensors fixed by the prompt that generate() carries to every decoding step (it repeats them
        per returned sequence): the prompt's embeddings with the images scattered in, and its modality per token
        (``mm_token_type_ids`` given to generate, else read off the placeholders). The model's
        `prepare_inputs_for_generation` cuts each step's inputs out of them."""
        prompt_types = kwargs.pop("mm_token_type_ids", None)
        inputs_embeds, derived_types = self.embed(model, input_ids, image_features)
        if prompt_types is None:
            prompt_types = derived_types
        elif tuple(prompt_types.shape) != tuple(input_ids.shape):
            raise ValueError(f"mm_token_type_ids must have the prompt's shape [batch, seq] = "
                             f"{tuple(input_ids.shape)}, got {tuple(prompt_types.shape)}")
        return {"prompt_embeds": inputs_embeds, "prompt_mm_token_type_ids": prompt_types.long()}

    # -- training stages -----------------------------------------------------------------------------------
    def stage_parameters(self, model, stage: int) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def apply_stage(self, model, stage: int) -> None:
        """Per-stage behaviour beyond which parameters train (PILL switches MAG and routing)."""


def _named(model, predicate) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if predicate(name)}


class PillMultimodal(MultimodalAdapter):
    method = "pill"

    def __init__(self, config: PillConfig, vision_dim: int, hidden_size: int, image_token_id: int):
        super().__init__(config, vision_dim, image_token_id)
        self.projector = (LinearProjector(vision_dim, hidden_size) if config.projector == "linear"
                          else MLPProjector(vision_dim, config.projector_hidden, hidden_size))

    def stage_parameters(self, model, stage: int) -> dict[str, nn.Parameter]:
        if stage == 1:  # projector + visual experts (docs/methods.md, PILL; the unused gates are left out)
            return _named(model, lambda n: n.startswith("multimodal.projector.") or ".experts.visual." in n)
        return _named(model, lambda n: n.startswith("multimodal.") or ".pill_" in n)

    def apply_stage(self, model, stage: int) -> None:
        for layer in model.model.layers:
            layer.pill_stage = stage


class LavinMultimodal(MultimodalAdapter):
    method = "lavin"

    def __init__(self, config: LavinConfig, vision_dim: int, hidden_size: int, image_token_id: int):
        super().__init__(config, vision_dim, image_token_id)
        self.projector = MLPProjector(vision_dim, config.projector_hidden, hidden_size)
        # The seed's adapter_modality_embedding: nn.Embedding(2, D), N(0, 1).
        self.modality_embedding = nn.Parameter(torch.randn(2, hidden_size))

    def layer_kwargs(self, model, mm_token_type_ids, image_features, extra, cache) -> dict:
        sequence_modality = extra.get("sequence_modality")
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
        return _named(model, lambda n: n.startswith("multimodal.") or ".pill_" in n)


class LlamaAdapterV2Multimodal(MultimodalAdapter):
    method = "llama_adapter_v2"

    def __init__(self, config: LlamaAdapterV2Config, vision_dim: int, hidden_size: int):
        super().__init__(config, vision_dim, None)
        self.projector = VisualPromptProjector(vision_dim, hidden_size, config.prompt_len, config.visual_blocks,
                                               config.visual_heads)
        self.tuned_bias_names: list[str] = []

    def embed(self, model, input_ids, image_features):
        return model.get_input_embeddings()(input_ids), None

    def layer_kwargs(self, model, mm_token_type_ids, image_features, extra, cache) -> dict:
        prompts = extra.get("visual_prompts")
        if prompts is None and image_features is not None:
            prompts = self.visual_prompts(image_features, extra.get("sequence_modality"))
        return {"mm_visual_prompts": prompts}

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
        prompts = self.projector(image_features.to(self.projector_dtype()))
        if sequence_modality is not None:  # text-only rows get no visual prompt
            prompts = prompts * sequence_modality.to(prompts.dtype)[:, None, None]
        return prompts

    def stage_parameters(self, model, stage: int) -> dict[str, nn.Parameter]:
        if stage == 1:  # gates, visual projector, adaption prompts (the seed's pretrain phase)
            return _named(model, lambda n: n.startswith("multimodal.") or ".pill_" in n)
        tuned = set(self.tuned_bias_names)
        return _named(model, lambda n: n in tuned or (self.config.norm_tuning and "norm.weight" in n
                                                      and not n.startswith("multimodal.")))


class MultimodalLlamaForCausalLM(LlamaForCausalLM):
    """A LlamaForCausalLM with a method injected; created by the `inject_*` functions, never directly."""

    multimodal: MultimodalAdapter

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, image_features=None,
                mm_token_type_ids=None, sequence_modality=None, visual_prompts=None, images=None, **kwargs):
        """LlamaForCausalLM.forward plus ``image_features``, ``mm_token_type_ids`` [B, S] (derived from the
        placeholders when omitted), ``sequence_modality`` [B] (LaVIN; derived from the mask when omitted),
        precomputed ``visual_prompts`` [B, K, D] (LLaMA-Adapter V2), and ``images`` for the attached frozen
        vision encoder (instead of ``image_features``). The KV cache may be passed as ``past_key_values`` or
        ``cache`` (the name transformers uses since 5.24)."""
        cache = take_cache(kwargs, past_key_values)
        mm = self.multimodal
        image_features = _features(mm, images, image_features)
        if self.training:
            _refuse_reentrant_checkpointing(self)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds, derived_types = mm.embed(self, input_ids, image_features)
            if mm_token_type_ids is None:
                mm_token_type_ids = derived_types
        elif image_features is not None and mm.image_token_id is not None:
            raise ValueError("pass image_features together with input_ids, not with inputs_embeds: the features "
                             "are scattered into the placeholder embeddings")
        if mm_token_type_ids is not None and tuple(mm_token_type_ids.shape) != tuple(inputs_embeds.shape[:2]):
            raise ValueError(f"mm_token_type_ids must have shape [batch, seq] = {tuple(inputs_embeds.shape[:2])}, "
                             f"got {tuple(mm_token_type_ids.shape)}")
        if attention_mask is not None and attention_mask.dim() == 2:
            past = cache.get_seq_length() if cache is not None else 0
            expected = (inputs_embeds.shape[0], past + inputs_embeds.shape[1])
            if tuple(attention_mask.shape) != expected:
                raise ValueError(f"attention_mask must have shape [batch, cached + new tokens] = {expected}, got "
                                 f"{tuple(attention_mask.shape)}")
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Count positions over real tokens only, so a left-padded sequence starts at 0 as it would alone. RoPE
            # scores between tokens are relative anyway, but LLaMA-Adapter V2's prompt keys carry no rotation.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1]:]
        if labels is not None and mm.image_token_id is not None and input_ids is not None:
            # Image positions are never supervised (the seed labels them 0 = ignore); their ids may lie outside
            # the vocabulary.
            labels = labels.masked_fill(labels == mm.image_token_id, -100)
        extra = {"sequence_modality": sequence_modality, "visual_prompts": visual_prompts,
                 "batch": inputs_embeds.shape[0]}
        layer_kwargs = mm.layer_kwargs(self, mm_token_type_ids, image_features, extra, cache)
        kwargs[CAUSAL_LM_CACHE_ARG] = cache
        return super().forward(attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, mm_token_type_ids=mm_token_type_ids,
                               **layer_kwargs, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, image_features=None, images=None, **kwargs):
        """transformers' generate with image features (or ``images`` for the attached encoder). Greedy decoding
        and sampling, batched with left padding; beam search and assisted decoding are refused.

        The prompt's per-row inputs are built once (its embeddings with the images scattered in, its modality
        per token, LaVIN's routing modality, LLaMA-Adapter V2's visual prompts) and each step's inputs are cut
        from them by `prepare_inputs_for_generation`, whatever the installed transformers slices itself.
        Returns prompt and generated ids, as generate does (image placeholders included)."""
        if input_ids is None:
            raise ValueError("generate needs input_ids (with the image placeholders) and image_features")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("pass input_ids and image_features to generate, not inputs_embeds: the model builds "
                             "the prompt's embeddings itself")
        _refuse_unsupported_decoding(self, kwargs)
        mm = self.multimodal
        image_features = _features(mm, images, image_features)
        kwargs.update(mm.generate_inputs(self, input_ids, image_features, kwargs))
        placeholders = input_ids == mm.image_token_id if mm.image_token_id is not None else None
        if placeholders is None or not placeholders.any():
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # Placeholder ids may lie outside the vocabulary, where logits processors (repetition penalty, n-gram
        # bans) index the scores with them. generate sees an in-vocabulary stand-in (the model reads the prompt
        # from prompt_embeds), and the output shows the placeholders again.
        pad = kwargs.get("pad_token_id", self.generation_config.pad_token_id)
        if attention_mask is None:  # as generate would infer it, but with the placeholders counted as real
            attention_mask = (input_ids != pad).long() if pad is not None else torch.ones_like(input_ids)
        stand_in = pad if isinstance(pad, int) and 0 <= pad < self.config.vocab_size else 0
        out = super().generate(input_ids=input_ids.masked_fill(placeholders, stand_in),
                               attention_mask=attention_mask, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        per_prompt = sequences.shape[0] // input_ids.shape[0]
        sequences[:, :input_ids.shape[1]] = input_ids.repeat_interleave(per_prompt, dim=0)
        return out

    def prepare_inputs_for_generation(self, input_ids, *args, prompt_embeds=None, prompt_mm_token_type_ids=None,
                                      **kwargs):
        """One decoding step's inputs. transformers picks the step's tokens (all of them without a cache, the
        new ones with it) and handles the cache and mask; the multimodal inputs are then cut from the prompt's
        per-row tensors for exactly those positions: prompt positions take the prompt's embeddings (images
        included) and modality, generated positions are text."""
        kwargs.pop("mm_token_type_ids", None)  # the prompt's types travel as prompt_mm_token_type_ids
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if prompt_mm_token_type_ids is None:
            return inputs
        step_ids = inputs.get("input_ids")
        if step_ids is None:
            raise RuntimeError("prepare_inputs_for_generation: the step's input_ids are missing (generate was "
                               "given inputs_embeds?); pass input_ids and image_features")
        total, prompt_len = input_ids.shape[1], prompt_mm_token_type_ids.shape[1]
        start = total - step_ids.shape[1]
        generated = total - max(start, prompt_len)
        types = prompt_mm_token_type_ids[:, start:]
        if generated:
            types = torch.cat([types, types.new_zeros(types.shape[0], generated)], dim=1)
        inputs["mm_token_type_ids"] = types
        if start < prompt_len:
            embeds = prompt_embeds[:, start:]
            if generated:
                embeds = torch.cat([embeds, self.get_input_embeddings()(input_ids[:, prompt_len:])], dim=1)
            inputs["inputs_embeds"] = embeds
            inputs["input_ids"] = None
        return inputs

    # -- conveniences ------------------------------------------------------------------------------------
    def set_stage(self, stage: int) -> None:
        set_stage(self, stage)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _refuse_unsupported_decoding(model, kwargs: dict) -> None:
    """Beam search reorders the KV cache between steps, and the PILL query-head gates stored beside it would not
    follow; assisted decoding crops it. Neither is supported: refuse rather than decode wrongly."""
    config = kwargs.get("generation_config") or model.generation_config
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    if beams > 1:
        raise ValueError(f"num_beams={beams}: beam search is not supported by the multimodal models; use greedy "
                         f"decoding or sampling (num_beams=1)")
    for name in ("assistant_model", "prompt_lookup_num_tokens", "penalty_alpha"):
        if kwargs.get(name) is not None or getattr(config, name, None) is not None:
            raise ValueError(f"{name} (assisted or contrastive decoding) is not supported by the multimodal "
                             f"models; use greedy decoding or sampling")


def _features(mm: MultimodalAdapter, images, image_features):
    if images is None:
        return image_features
    if image_features is not None:
        raise ValueError("pass images or image_features, not both")
    return mm.encode_images(images)


def _refuse_reentrant_checkpointing(model) -> None:
    for layer in model.model.layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(layer, "gradient_checkpointing", False) and getattr(func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "gradient checkpointing with use_reentrant=True drops the gradients of per-call inputs that reach "
                "the layers as keyword arguments (LaVIN routing, LLaMA-Adapter V2 visual prompts); enable it with "
                "gradient_checkpointing_kwargs={'use_reentrant': False}")


# ----------------------------------------------------------------------------------------------------------
# Injection
# ----------------------------------------------------------------------------------------------------------

def _swap_layers(model, layer_class, init) -> None:
    for index, layer in enumerate(model.model.layers):
        layer.__class__ = layer_class
        init(index, layer)


def _finish(model, multimodal: MultimodalAdapter, vision_encoder=None) -> MultimodalLlamaForCausalLM:
    multimodal.set_vision_encoder(vision_encoder)
    device = model.get_input_embeddings().weight.device
    for p in model.parameters():
        p.requires_grad_(False)
    # Adapters stay fp32 (the seed keeps them fp32 under autocast) but live on the model's device.
    multimodal.to(device)
    for layer in model.model.layers:
        for name, p in layer.named_parameters():
            if name.startswith("pill_") and p.device != device:
                p.data = p.data.to(device)
    model.__class__ = MultimodalLlamaForCausalLM
    model.multimodal = multimodal
    model.train(model.training)  # new submodules start in training mode; follow the model's mode
    set_stage(model, multimodal.stage)
    return model


def inject_pill(model: LlamaForCausalLM, config: PillConfig | None = None, *, vision_dim: int,
                image_token_id: int, vision_encoder=None) -> MultimodalLlamaForCausalLM:
    """Add PILL to `model` in place (all layers): attention adapter, MAG, MoMAE; returns the model.

    At initialisation a text-only input gives the base model's logits (zero up-projections; MAG only touches
    image tokens). The model starts in stage 1 (training order); ``set_stage(model, 2)`` moves on.
    """
    config = config or PillConfig()
    _check_llama(model)
    _check_vision_dim(vision_dim)
    hc = model.config
    last = hc.num_hidden_layers - 1
    _swap_layers(model, PillDecoderLayer, lambda i, layer: layer.pill_init(hc, config, i == last))
    return _finish(model, PillMultimodal(config, vision_dim, hc.hidden_size, image_token_id), vision_encoder)


def inject_lavin(model: LlamaForCausalLM, config: LavinConfig | None = None, *, vision_dim: int,
                 image_token_id: int, vision_encoder=None) -> MultimodalLlamaForCausalLM:
    """Add LaVIN's mixture-of-modality adapters to `model` in place; returns the model.

    Routing is soft and per sequence, from a learned modality token that attends only to itself (as in the
    seed), so a sequence's output never depends on the rest of the batch.
    """
    config = config or LavinConfig()
    _check_llama(model)
    _check_vision_dim(vision_dim)
    hc = model.config
    _swap_layers(model, LavinDecoderLayer, lambda i, layer: layer.pill_init(hc, config))
    return _finish(model, LavinMultimodal(config, vision_dim, hc.hidden_size, image_token_id), vision_encoder)


def inject_llama_adapter_v2(model: LlamaForCausalLM, config: LlamaAdapterV2Config | None = None, *,
                            vision_dim: int, vision_encoder=None) -> MultimodalLlamaForCausalLM:
    """Add LLaMA-Adapter V2 to `model` in place: gated adaption prompts in the last layers with visual
    features added, zero-init biases (bias tuning) and trainable norms; returns the model."""
    config = config or LlamaAdapterV2Config()
    _check_llama(model)
    _check_vision_dim(vision_dim)
    hc = model.config
    prompt_layers = config.prompt_layers if config.prompt_layers is not None else max(hc.num_hidden_layers - 1, 1)
    if prompt_layers > hc.num_hidden_layers:
        raise ValueError(f"LlamaAdapterV2Config.prompt_layers ({prompt_layers}) exceeds the model's "
                         f"{hc.num_hidden_layers} layers")
    first_prompted = hc.num_hidden_layers - prompt_layers
    _swap_layers(model, LlamaAdapterV2DecoderLayer,
                 lambda i, layer: layer.pill_init(hc, config, i >= first_prompted))
    multimodal = LlamaAdapterV2Multimodal(config, vision_dim, hc.hidden_size)
    if config.bias_tuning:
        for name, module in model.model.layers.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and leaf in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                if module.bias is None:
                    module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                           device=module.weight.device))
                multimodal.tuned_bias_names.append(f"model.layers.{name}.bias")
    return _finish(model, multimodal, vision_encoder)


# ----------------------------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------------------------

def _multimodal(model) -> MultimodalAdapter:
    if not isinstance(model, MultimodalLlamaForCausalLM):
        raise TypeError(f"expected a model returned by inject_pill / inject_lavin / inject_llama_adapter_v2, got "
                        f"{type(model).__name__}")
    return model.multimodal


def stage_parameters(model, stage: int) -> dict[str, nn.Parameter]:
    """The parameters trained in `stage`, by name."""
    mm = _multimodal(model)
    if stage not in mm.config.stages:
        raise ValueError(f"{mm.method} has stages {mm.config.stages}, got stage {stage!r}")
    return mm.stage_parameters(model, stage)


def adapter_parameters(model) -> dict[str, nn.Parameter]:
    """Every parameter the method trains in any stage: what an adapter checkpoint holds."""
    mm = _multimodal(model)
    names: dict[str, nn.Parameter] = {}
    for stage in mm.config.stages:
        names.update(mm.stage_parameters(model, stage))
    return dict(sorted(names.items()))


def set_stage(model, stage: int) -> None:
    """Make exactly `stage`'s parameters trainable and switch stage-dependent behaviour (PILL's MAG bypass and
    last-layer routing in stage 1)."""
    mm = _multimodal(model)
    trainable = stage_parameters(model, stage)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    mm.stage = stage
    mm.apply_stage(model, stage)


def trainable_parameter_report(model) -> str:
    """Trainable parameter counts of every stage, split by component."""
    mm = _multimodal(model)
    total = sum(p.numel() for p in model.parameters())
    lines = [f"{mm.method}: {total:,} parameters in all; current stage {mm.stage}"]
    for stage in mm.config.stages:
        params = stage_parameters(model, stage)
        groups: dict[str, int] = {}
        for name, p in params.items():
            groups[_component(name)] = groups.get(_component(name), 0) + p.numel()
        count = sum(groups.values())
        lines.append(f"  stage {stage}: {count:,} trainable ({100.0 * count / total:.3f}%)")
        for component, n in sorted(groups.items()):
            lines.append(f"    {component:<28} {n:>14,}")
    return "\n".join(lines)


def _component(name: str) -> str:
    if name.startswith("multimodal."):
        return name.split(".")[1]
    parts = name.split(".")
    for part in parts:
        if part.startswith("pill_"):
            return part + ("." + parts[parts.index(part) + 2] if part == "pill_ffn_experts" else "")
    if "norm" in name:
        return "norms"
    if name.endswith(".bias"):
        return "biases"
    return parts[-1]
