"""What the three methods share: the config base, the registry record, the decoder-layer base with its helpers,
the model-level module base, the MLP projector, and the injection steps every method takes.

A method module (`pill.py`, `lavin.py`, `llama_adapter_v2.py` next to this file) holds its whole definition:
config, adapter modules, decoder layer, model-level module, inject function, stage parameter sets, and its
`METHOD` record, which `pill.methods` collects into the registry.

Adapter weights live in fp32 (or whatever dtype they were created in) and are cast to the activation dtype at
call time, as the seed code's fp32 adapters under bf16 autocast do.
"""
from __future__ import annotations

import dataclasses
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer
# The four families' modules hold identical copies of these two (pill.families).
from transformers.models.llama.modeling_llama import (ALL_ATTENTION_FUNCTIONS, apply_rotary_pos_emb,
                                                      eager_attention_forward)

from pill_kernels.dispatch import CHOICES

from ..families import FAMILIES, LLAMA, Family

# ----------------------------------------------------------------------------------------------------------
# Config and registry record
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MethodConfig:
    """Base of the method configs. Every field has the seed code's value as its default. ``backend`` is the kernel
    backend the model's fused ops use (None: `pill_kernels.get_backend()`); it is a run-time choice, applied at
    injection, changed with `pill.set_kernel_backend`, and never saved with an adapter."""

    method: ClassVar[str]
    stages: ClassVar[tuple[int, ...]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def _positive(self, **values: int) -> None:
        for name, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    def _check_backend(self) -> None:
        check_backend(self.backend, f"{type(self).__name__}.backend")


def check_backend(backend: str | None, argument: str = "backend") -> str | None:
    if backend is not None and backend not in CHOICES:
        raise ValueError(f"{argument} must be None or one of {CHOICES}, got {backend!r}")
    return backend


@dataclass(frozen=True)
class Method:
    """A method as the CLI, the demo, checkpoints and the trainer see it (`pill.methods.get_method(name)`)."""

    name: str
    config_class: type[MethodConfig]
    # (model, config, *, vision_dim, image_token_id, vision_encoder) -> the injected model. image_token_id is
    # None for methods whose images do not enter as placeholder tokens.
    inject: Callable[..., Any]
    # Images enter the text as placeholder tokens (PILL, LaVIN) rather than beside it (LLaMA-Adapter V2's prompts).
    image_placeholders: bool
    # FSDP may shard each decoder layer as its own unit (see `pill.trainer.shard_with_fsdp`).
    fsdp_layer_units: bool = True
    # The demo's choices for this method: config fields, and `pill.demo.DemoSettings` fields (why: in the module).
    demo_config: dict = field(default_factory=dict)
    demo_settings: dict = field(default_factory=dict)
    # (SeedKeys, base LlamaConfig, config overrides: dict, image_token_id or None) -> SeedConversion: the seed
    # repository's released checkpoint in this project's adapter layout (`pill.convert`).
    convert_seed: Callable[..., Any] | None = None
    # (the adapter's saved method config) -> why vLLM cannot run this adapter exactly, or None where `pill.serve`
    # serves it.
    vllm_refusal: Callable[[dict], str | None] = lambda config: "no vLLM model is written for it"


# ----------------------------------------------------------------------------------------------------------
# Decoder layers
# ----------------------------------------------------------------------------------------------------------

# Per-call multimodal inputs reach the decoder layers as keyword arguments, which transformers passes to every
# layer: ``mm_token_type_ids`` [B, S] (1 for image tokens), ``mm_routing_weights`` [B, L, E] (LaVIN; per token
# [B, S, L, E] in packed rows), ``mm_visual_prompts`` [B, K, D] (LLaMA-Adapter V2; [B, G, K, D] in packed rows,
# one slot per example of the row, with ``mm_prompt_sequence_ids`` [B, G] naming the slots' examples) and
# ``mm_sequence_ids`` [B, S] (packed rows: each token's example, `pill.packing`).
MULTIMODAL_LAYER_KWARGS = ("mm_token_type_ids", "mm_routing_weights", "mm_visual_prompts", "mm_prompt_sequence_ids",
                           "mm_sequence_ids")


def pop_multimodal(kwargs: dict) -> dict:
    return {name: kwargs.pop(name, None) for name in MULTIMODAL_LAYER_KWARGS}


def image_mask(mm_token_type_ids: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor:
    if mm_token_type_ids is None:
        return torch.zeros(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
    if tuple(mm_token_type_ids.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"mm_token_type_ids must have shape [batch, seq] = {tuple(hidden_states.shape[:2])}, got "
                         f"{tuple(mm_token_type_ids.shape)}")
    return mm_token_type_ids.to(torch.bool)


def key_padding_from_attention_mask(attention_mask: torch.Tensor | None, batch: int, seq_k: int):
    """Which keys are real tokens, read off the mask transformers builds for the attention functions: those that
    some query sees.

    Every real key is seen by a query of the mask (under a causal mask the last row sees all of them; under a
    sliding-window mask each key is seen by the queries within a window after it, or by none when it lies before
    every query's window, where the window drops it anyway), and no query sees a padding key.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        valid = attention_mask.to(torch.bool)
    else:
        seen = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] == 0
        valid = seen.any(dim=1)
    return valid[:, :seq_k].expand(batch, seq_k)


def attention_structure(attention_mask: torch.Tensor | None, sequence_ids: torch.Tensor | None, batch: int,
                        seq_k: int, window: int | None) -> dict:
    """The gated-attention op's view of which keys a query sees: the layer's sliding window, and the packed
    rows' segments when there are any (the 4D mask then is block-diagonal and says nothing about padding), else
    the padding read off the mask."""
    if sequence_ids is not None:
        return {"segment_ids": sequence_ids, "window": window}
    return {"key_padding_mask": key_padding_from_attention_mask(attention_mask, batch, seq_k), "window": window}


class MultimodalDecoderLayer(GradientCheckpointingLayer):
    """Base of the method layers; never instantiated directly.

    A method's layer (`PillDecoderLayer`, ...) is combined with each family's transformers decoder layer into
    one class per family (`register_family_layers`: ``PillQwen2DecoderLayer(PillDecoderLayer,
    Qwen2DecoderLayer)``), whose ``family`` says how its attention differs (`pill.families`). Injection swaps
    each layer's class for the method's class of the model's family and adds the adapter submodules; the base
    weights stay where they are. The layer stays an instance of its family's decoder layer, which transformers'
    output capture (``output_hidden_states``) looks for. Because the forward goes through
    GradientCheckpointingLayer's wrapper, gradient checkpointing still recomputes the patched layers
    (overriding ``forward`` on an instance would bypass it). ``kernel_backend`` is the backend of the layer's
    fused ops (None: pill_kernels' default); ``attention_dtype`` the dtype its attention runs in when that
    differs from the activations' (set by `pill.set_compute_dtype`: a CPU's flash attention can be several
    times slower in bf16 than in fp32).
    """

    family: ClassVar[Family] = LLAMA
    kernel_backend: str | None = None
    attention_dtype: torch.dtype | None = None
    # The layer's sliding window (keys within that many positions up to the query's own), as its family's
    # attention module reads the config (`Family.layer_windows`); None: full causal attention. Set at injection.
    attention_window: int | None = None

    @contextlib.contextmanager
    def _attention_precision(self, like: torch.Tensor):
        """Yields the cast into this layer's attention dtype (identity when there is none); inside, autocast is
        off so that it does not cast the attention's inputs back to half precision."""
        dtype = self.attention_dtype
        if dtype is None or like.dtype == dtype:
            yield lambda t: t
            return
        with torch.autocast(like.device.type, enabled=False):
            yield lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t

    def _project(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One frozen projection of the block (`name`: transformers' name, e.g. "q_proj"); a method that adapts
        the projections themselves (LLaMA-Adapter V2.1's LoRA) overrides this."""
        return module(x)

    def _qkv(self, attn_input: torch.Tensor):
        """q [B, H, S, hd], k [B, Hkv, S, hd] before RoPE, v [B, S, Hkv, hd] (for the value gate): the
        projections with their biases, and the family's per-head q/k norms where transformers applies them."""
        attn = self.self_attn
        batch, seq = attn_input.shape[:2]
        q = self._project("q_proj", attn.q_proj, attn_input).view(batch, seq, -1, attn.head_dim)
        k = self._project("k_proj", attn.k_proj, attn_input).view(batch, seq, -1, attn.head_dim)
        q, k = self.family.query_key_norms(attn, q, k)
        v = self._project("v_proj", attn.v_proj, attn_input).view(batch, seq, -1, attn.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v

    def _standard_attention(self, q, k, v, attention_mask, kwargs) -> torch.Tensor:
        attn = self.self_attn
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                                    eager_attention_forward)
        # The sdpa and eager paths take the window from the mask the model built for this layer's type; flash
        # attention from the sliding_window argument, as the family's attention module passes it.
        with self._attention_precision(q) as cast:
            out, _ = interface(attn, cast(q), cast(k), cast(v), cast(attention_mask),
                               dropout=0.0 if not self.training else attn.attention_dropout, scaling=attn.scaling,
                               sliding_window=self.attention_window, **kwargs)
        return out.to(q.dtype).reshape(*out.shape[:2], -1)

    def _rope_and_cache(self, q, k, v, position_embeddings, cache):
        cos, sin = position_embeddings
        dtype = q.dtype
        # With a half-precision base the rotary tables follow the fp32 residual stream; q and k stay in the
        # projections' dtype, as v does (the KV cache and the attention ops take one dtype).
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k = q.to(dtype), k.to(dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.self_attn.layer_idx)
        return q, k, v

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def rms_norm_args(norm: nn.Module | None, dtype: torch.dtype) -> dict:
    """The keyword arguments that fuse a LlamaRMSNorm into an adapter op."""
    if norm is None:
        return {}
    return {"norm_weight": norm.weight.to(dtype), "eps": norm.variance_epsilon}


# ----------------------------------------------------------------------------------------------------------
# Model level
# ----------------------------------------------------------------------------------------------------------

class MultimodalAdapter(nn.Module):
    """Model-level part of a method (``model.multimodal``): the projector and method-specific state; knows how
    to prepare a call's inputs and which parameters each stage trains."""

    method: str
    kernel_backend: str | None = None  # set by `pill.set_kernel_backend`, with every adapter module's
    compute_dtype: torch.dtype | None = None  # the frozen base's, when not fp32 (`pill.set_compute_dtype`)
    attention_dtype: torch.dtype | None = None  # the layers' attention's, when it differs (same function)

    def __init__(self, config: MethodConfig, vision_dim: int, image_token_id: int | None):
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
        object.__setattr__(self, "vision_encoder", None if encoder is None else self.feature_encoder(encoder))

    def feature_encoder(self, encoder):
        """The encoder whose features this model takes: `encoder` itself, or, for a method with adapters inside
        the vision tower (LaVIN's vision routers), a view of it that runs them (and whose cache key names their
        weights). `pill eval` / `pill generate` encode through it."""
        return encoder

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
        projected = self.project(image_features).to(embeds.dtype)
        embeds = embeds.masked_scatter(placeholders.unsqueeze(-1), projected.reshape(-1, projected.shape[-1]))
        return embeds, placeholders.long()

    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        """The projector on `image_features`, in the projector's own dtype (fp32) outside the base's autocast, as
        the LM head (`pill.model.FullPrecisionLinear`): a trained input path of a few GEMMs per image, where
        bf16 saves little (docs/training.md, "Compute dtype of the frozen base")."""
        with torch.autocast(image_features.device.type, enabled=False):
            return self.projector(image_features.to(self.projector_dtype()))

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

    @property
    def takes_pixels(self) -> bool:
        """True when part of the vision tower trains with the method (LaVIN's vision routers): the model must
        then encode the images itself, inside the training graph, so batches carry preprocessed ``images``
        instead of cached ``image_features``."""
        return False

    # -- training stages -----------------------------------------------------------------------------------
    def stage_parameters(self, model, stage: int) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def apply_stage(self, model, stage: int) -> None:
        """Per-stage behaviour beyond which parameters train (PILL switches MAG and routing)."""


def parameters_where(model, predicate) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if predicate(name)}


class MLPProjector(nn.Module):
    """LaVIN's AdapterMLP (also PILL's projector="mlp"): Linear(C, h) - SiLU - Linear(h, D), xavier-initialised."""

    def __init__(self, vision_dim: int, hidden: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden_size)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(features)))


# ----------------------------------------------------------------------------------------------------------
# Injection steps
# ----------------------------------------------------------------------------------------------------------

def check_vision_dim(vision_dim: int) -> None:
    if not isinstance(vision_dim, int) or isinstance(vision_dim, bool) or vision_dim <= 0:
        raise ValueError(f"vision_dim must be the positive feature width C of the vision encoder, got {vision_dim!r}")


_FAMILY_LAYERS: dict[tuple[type, str], type] = {}


def register_family_layers(method_layer: type) -> None:
    """Create `method_layer`'s class for every family (``Pill`` + ``Qwen2DecoderLayer`` ->
    ``PillQwen2DecoderLayer``), named in the method's module so that injected models pickle."""
    module = sys.modules[method_layer.__module__]
    prefix = method_layer.__name__.removesuffix("DecoderLayer")
    for family in FAMILIES.values():
        name = prefix + family.decoder_layer.__name__
        layer_class = type(name, (method_layer, family.decoder_layer),
                           {"family": family, "__module__": module.__name__, "__qualname__": name,
                            "__doc__": f"{method_layer.__name__} on a {family.label} block."})
        setattr(module, name, layer_class)
        _FAMILY_LAYERS[method_layer, family.name] = layer_class


def swap_layers(model, method_layer: type, family: Family, init) -> None:
    """Every decoder layer of `model` (of `family`) becomes `method_layer`'s class for that family; `init(index,
    layer)` then adds the adapters."""
    layer_class = _FAMILY_LAYERS[method_layer, family.name]
    windows = family.layer_windows(model.config)
    for index, layer in enumerate(model.model.layers):
        if type(layer) is not family.decoder_layer:
            raise TypeError(f"layer {index} of the {family.label} model is a {type(layer).__name__}, not a "
                            f"{family.decoder_layer.__name__}")
        layer.__class__ = layer_class
        layer.attention_window = windows[index]
        init(index, layer)
