"""PILL on vLLM: vLLM's own model of the base's family (LLaMA, which vLLM also runs Mistral with, Qwen2, Qwen3:
its fused projections with the family's biases, Qwen3's per-head q/k norms, rotary embedding, paged attention
with the family's sliding window, weight loading) with PILL's adapter modules and fused ops in each decoder
layer, as a multimodal model. Images arrive as pictures
(the processor prepares them as the run's vision encoder does; the model runs the frozen encoder, then the
adapter's projector) or as the encoder's precomputed features (vLLM's image embeddings input,
`enable_mm_embeds=True`).

Only vLLM imports this module, through `pill.serve.register`. The adapter's modules are the training model's
(`pill.methods.pill`), with the same parameter names, so `adapter_model.safetensors` loads as saved, and the ops
run through the same dispatch (`PILL_KERNELS_BACKEND`, else "auto").

Which tokens are image tokens: vLLM hands the model the mask of a step's image positions only in
`embed_input_ids` (built per request from each image's placeholder range and the tokens already computed, so
it stays right under batching, chunked prefill and prefix-cache hits); the model keeps it for the `forward`
that follows and passes it to every layer, as vLLM's own per-token vision-expert models do. Under
torch.compile the mask is a graph input: a graph traced without it (vLLM's profiling run) would otherwise be
reused for every later step, image tokens silently running as text."""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence

import torch
from transformers import BatchFeature
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM
from vllm.model_executor.models.utils import _merge_multimodal_embeddings, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement, PromptUpdate)
from vllm.multimodal.processing.inputs import ProcessorInputs
from vllm.sequence import IntermediateTensors

import pill_kernels as pk

from ..checkpoint import WEIGHTS_NAME, read_adapter_config
from ..files import read_json, read_safetensors
from ..methods import get_method
from ..methods.pill import ModalityGate, PillConfig, PillDecoderLayer, PillMultimodal, RoutedGLUAdapter
from .model_dir import ServingError, refusal

# The size of the pictures vLLM profiles memory with (the encoder's own preprocessing resizes them).
_DUMMY_IMAGE_SIZE = 224


class _ServedAdapter:
    """What the served model directory says about its adapter (`pill.serve.prepare_served_model` wrote it)."""

    def __init__(self, path: str, image_token_id: int, image_tokens: int) -> None:
        self.path = path
        self.record = read_adapter_config(self.path)
        refused = refusal(self.record)
        if refused:
            raise ServingError(f"{self.path}: {refused}")
        if get_method(self.record["pill_type"]).config_class is not PillConfig:
            raise ServingError(f"{self.path}: the served models take PILL adapters, this one is "
                               f"{self.record['pill_type']}")
        self.config = PillConfig.from_dict(self.record["config"])
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens
        self.vision_dim = int(self.record["vision_dim"])
        self.stage = int(self.record["stage"])
        run = os.path.join(self.path, "pill_run.json")
        # The frozen vision encoder's spec (`pill.vision.build_encoder`), or None: features only.
        self.vision = read_json(Path(run), "the adapter's run record").get("vision") if os.path.isfile(run) else None

    @functools.cached_property
    def preprocess(self):
        """Pictures -> the encoder's pixel input, without the encoder's weights (the front end's part)."""
        from ..vision import image_preprocessor

        return image_preprocessor(self.vision)

    def build_encoder(self, device: torch.device):
        """The frozen encoder, in fp32 whatever vLLM's default dtype (training encoded images in fp32), on
        `device`."""
        from ..vision import build_encoder

        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            with torch.device("cpu"):
                encoder = build_encoder(self.vision)
        finally:
            torch.set_default_dtype(dtype)
        return encoder.to(device)


@functools.lru_cache(maxsize=None)
def _read_served_adapter(path: str, image_token_id: int, image_tokens: int) -> _ServedAdapter:
    return _ServedAdapter(path, image_token_id, image_tokens)


def _served_adapter(model_config) -> _ServedAdapter:
    """The served adapter, read once per process: every decoder layer and every request's prompt processing
    asks for it."""
    hf = model_config.hf_config
    return _read_served_adapter(os.path.join(model_config.model, hf.pill_adapter), int(hf.pill_image_token_id),
                                int(hf.pill_image_tokens))


def _refuse_parallelism(vllm_config: VllmConfig) -> None:
    # Tensor parallelism shards V by KV heads, and the gate's weight would have to follow; pipeline parallelism
    # is untested. Neither is run until it is tested.
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise ServingError(f"the served PILL models run on one device: tensor_parallel_size="
                           f"{parallel.tensor_parallel_size}, pipeline_parallel_size="
                           f"{parallel.pipeline_parallel_size} are not supported yet")


class PillServedLayer:
    """PILL's block (`pill.methods.pill.PillDecoderLayer`) in vLLM's decoder layer of the base's family, whose
    modules it calls as they are (the q/k/v projection with the family's biases, Qwen3's q_norm / k_norm where
    the attention has them, the rotary embedding, the paged attention with the family's window):

        n = RMSNorm_att(x), a = n + A_att(n);  V <- tanh(a W_g) V at image tokens, per KV head, before the cache
        h = x + Attn(a);  m = RMSNorm_ffn(h), u = m + A_visual|text(m);  out = h + FFN(u)

    Between layers vLLM's convention: a layer returns (FFN(u), h), and the next one (or the final norm) adds
    them. Combined with each family's layer below (`PillLlamaVllmDecoderLayer`, ...)."""

    pill_gate_enabled = PillDecoderLayer.pill_gate_enabled
    pill_expert_ids = PillDecoderLayer.pill_expert_ids

    def _pill_init(self, vllm_config: VllmConfig, hf, prefix: str) -> None:
        served = _served_adapter(vllm_config.model_config)
        hidden, rank = hf.hidden_size, served.config.adapter_dim
        self.kernel_backend = None  # the global dispatch: PILL_KERNELS_BACKEND, else auto
        self.pill_attn_adapter = RoutedGLUAdapter(hidden, rank, ("attn",))
        self.pill_ffn_experts = RoutedGLUAdapter(hidden, rank, ("text", "visual"))
        self.pill_value_gate = ModalityGate(hidden, hf.num_key_value_heads)
        self.pill_stage = served.stage
        self.pill_is_last_layer = int(prefix.split(".")[-1]) == hf.num_hidden_layers - 1
        self.pill_invert_last_layer = served.config.stage1_invert_last_layer

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                pill_image_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if pill_image_mask is None:
            raise RuntimeError(f"{type(self).__name__}: no image mask reached the layer")
        x = hidden_states if residual is None else hidden_states + residual
        attn = self.self_attn
        a = self.pill_attn_adapter(x, norm=self.input_layernorm)
        qkv, _ = attn.qkv_proj(a)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: per head, before RoPE, as vLLM's Qwen3Attention
            q = attn.q_norm(q.view(*q.shape[:-1], -1, attn.head_dim)).view(q.shape)
            k = attn.k_norm(k.view(*k.shape[:-1], -1, attn.head_dim)).view(k.shape)
        if self.pill_gate_enabled:
            # Gated before vLLM writes V into its paged cache, so the cache holds gated values, as transformers'.
            v = pk.modality_gate(a.to(v.dtype), self.pill_value_gate.weight.to(v.dtype),
                                 v.view(v.shape[0], -1, attn.head_dim), pill_image_mask).reshape(v.shape)
        q, k = attn.rotary_emb(positions, q, k)
        out, _ = attn.o_proj(attn.attn(q, k, v))
        h = x + out
        u = self.pill_ffn_experts(h, self.pill_expert_ids(pill_image_mask), norm=self.post_attention_layernorm)
        return self.mlp(u), h


class PillLlamaVllmDecoderLayer(PillServedLayer, LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        LlamaDecoderLayer.__init__(self, vllm_config=vllm_config, prefix=prefix, config=config)
        self._pill_init(vllm_config, config or vllm_config.model_config.hf_config, prefix)


class _PillQwenLayer(PillServedLayer):
    """Before vLLM's Qwen2 / Qwen3 layer, whose constructor it calls (next in the MRO)."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        super().__init__(config=config, cache_config=cache_config, quant_config=quant_config, prefix=prefix)
        # vLLM builds Qwen layers from the config alone; the served adapter is found through the model's.
        self._pill_init(get_current_vllm_config(), config, prefix)


class PillQwen2VllmDecoderLayer(_PillQwenLayer, Qwen2DecoderLayer):
    pass


class PillQwen3VllmDecoderLayer(_PillQwenLayer, Qwen3DecoderLayer):
    pass


class PillProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def served(self) -> _ServedAdapter:
        return _served_adapter(self.ctx.model_config)

    def get_default_tok_params(self):
        # The run's chat template writes every special token (as training's formatter tokenizes a chat), so the
        # rendered text is tokenized without adding any.
        return dataclasses.replace(super().get_default_tok_params(), add_special_tokens=False)

    def _get_expected_hidden_size(self) -> int | None:
        # The embeddings given are the vision encoder's features [tokens, C]; the projector maps them to the
        # model's width inside the model.
        return self.served().vision_dim


class PillDummyInputsBuilder(BaseDummyInputsBuilder[PillProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""  # the profiling prompt is built from token ids (PillMultiModalProcessor.get_dummy_inputs)

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options=None):
        served, count = self.info.served(), mm_counts.get("image", 0)
        if served.vision is not None:  # profile with the encoder running too
            return {"image": self._get_dummy_images(width=_DUMMY_IMAGE_SIZE, height=_DUMMY_IMAGE_SIZE,
                                                    num_images=count)}
        return {"image": [torch.zeros(served.image_tokens, served.vision_dim) for _ in range(count)]}


class PillMultiModalProcessor(BaseMultiModalProcessor[PillProcessingInfo]):
    """A prompt holds one image token per image; it becomes as many placeholders as the image has feature rows.
    Pictures become the encoder's pixel input here; features pass through."""

    def get_dummy_inputs(self, seq_len: int, mm_counts: Mapping[str, int], mm_options) -> ProcessorInputs:
        # vLLM's profiling prompt, as token ids: the image token id need not be what the tokenizer makes of any
        # text (an adapter trained with an id past the vocabulary is served under an id of the caller's choice).
        images = mm_counts.get("image", 0)
        data = self.dummy_inputs.get_dummy_mm_data(seq_len, mm_counts, mm_options)
        return ProcessorInputs(prompt=[self.info.served().image_token_id] * images,
                               mm_data_items=self.info.parse_mm_data(data, validate=False))

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        served = self.info.served()
        if served.vision is None:
            raise ServingError(f"{served.path} has no run record naming its vision encoder: this server takes "
                               f"images as precomputed features only (image embeddings)")
        return BatchFeature({"pixel_values": served.preprocess(list(hf_data["images"]))})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        return dict(pixel_values=MultiModalFieldConfig.batched("image"),
                    image_embeds=MultiModalFieldConfig.batched("image"))

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        served = self.info.served()

        def placeholders(item: int) -> list[int]:
            # looked up per item: vLLM also asks for the updates of a request whose items are all cached
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            rows = images.get_feature_size(item) if isinstance(images, ImageEmbeddingItems) else served.image_tokens
            return [served.image_token_id] * rows

        return [PromptReplacement(modality="image", target=[served.image_token_id], replacement=placeholders)]


# The image mask is a graph input of the compiled model (see the module docstring).
_DYNAMIC_DIMS = {"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0,
                 "pill_image_mask": 0}


@support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS)
class PillLlamaModel(LlamaModel):
    """LlamaModel whose compiled graph takes the image mask as an input."""

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None, inputs_embeds: torch.Tensor | None = None,
                pill_image_mask: torch.Tensor | None = None):
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                               pill_image_mask=pill_image_mask)


@support_torch_compile(dynamic_arg_dims=_DYNAMIC_DIMS)
class PillQwenModel(Qwen2Model):
    """vLLM's Qwen2 model (Qwen3's is the same with Qwen3 layers) passing the image mask to every layer, which
    its own forward does not; one device (no pipeline stages, no auxiliary hidden states)."""

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None, inputs_embeds: torch.Tensor | None = None,
                pill_image_mask: torch.Tensor | None = None):
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers[self.start_layer:self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual, pill_image_mask=pill_image_mask)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class PillServedCausalLM:
    """What the served models of every family share: the adapter's model-level module (projector), pictures
    through the frozen encoder, the image mask from `embed_input_ids` to the layers, the adapter's weights. Comes
    first in each family's class, before vLLM's CausalLM of the family."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"{cls.__name__} takes images only, not {modality!r}")

    def _pill_setup(self, vllm_config: VllmConfig) -> None:
        served = _served_adapter(vllm_config.model_config)
        self._served = served
        self._adapter_path = served.path
        self._vision_encoder = None  # built on first use: not a submodule (its weights are not in the checkpoint)
        self.multimodal = PillMultimodal(served.config, served.vision_dim,
                                         vllm_config.model_config.hf_config.hidden_size, served.image_token_id)
        self._pill_image_mask: torch.Tensor | None = None

    def _encode(self, pixels: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        if self._vision_encoder is None:
            self._vision_encoder = self._served.build_encoder(self.model.embed_tokens.weight.device)
        if isinstance(pixels, torch.Tensor):
            return list(self._vision_encoder(pixels))
        return [self._vision_encoder(p[None])[0] for p in pixels]

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        features, pixels = kwargs.pop("image_embeds", None), kwargs.pop("pixel_values", None)
        if features is not None and pixels is not None:
            raise RuntimeError("vLLM batched pictures and image features in one call; each item needs its own")
        if pixels is not None:
            features = self._encode(pixels)
        if features is None:
            return []
        if isinstance(features, torch.Tensor):
            features = list(features) if features.dim() == 3 else [features]
        # The projector in its own dtype, outside autocast, as in training (PillMultimodal.project).
        return tuple(self.multimodal.project(f).to(self.model.embed_tokens.weight.dtype) for f in features)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: MultiModalEmbeddings | None = None,
                        *, is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        mask = (torch.zeros_like(input_ids, dtype=torch.bool) if is_multimodal is None
                else is_multimodal.to(input_ids.device, non_blocking=True))
        self._pill_image_mask = mask
        embeds = self.model.embed_input_ids(input_ids.masked_fill(mask, 0))
        if not multimodal_embeddings or is_multimodal is None:
            return embeds
        return _merge_multimodal_embeddings(embeds, multimodal_embeddings, mask)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor | IntermediateTensors:
        mask, self._pill_image_mask = self._pill_image_mask, None
        tokens = inputs_embeds if inputs_embeds is not None else input_ids
        if mask is None:  # a step that did not go through embed_input_ids (vLLM's profiling run): all text
            mask = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        elif mask.shape[0] < tokens.shape[0]:  # a batch padded to a captured size: the padding is text
            mask = torch.cat([mask, mask.new_zeros(tokens.shape[0] - mask.shape[0])])
        elif mask.shape[0] > tokens.shape[0]:
            raise RuntimeError(f"the image mask covers {mask.shape[0]} tokens, the step has {tokens.shape[0]}")
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds, pill_image_mask=mask)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = set(super().load_weights(weights))
        tensors = read_safetensors(os.path.join(self._adapter_path, WEIGHTS_NAME))
        params = {n: p for n, p in self.named_parameters() if ".pill_" in n or n.startswith("multimodal.")}
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise ServingError(f"{self._adapter_path}: the adapter does not fit the served model: missing "
                               f"{missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, p in params.items():
                if tuple(p.shape) != tuple(tensors[name].shape):
                    raise ServingError(f"{self._adapter_path}: {name} has shape {tuple(tensors[name].shape)}, the "
                                       f"served model's {tuple(p.shape)}")
                p.copy_(tensors[name].to(p.dtype))
        return loaded | set(params)


_PROCESSOR = dict(info=PillProcessingInfo, dummy_inputs=PillDummyInputsBuilder)


@MULTIMODAL_REGISTRY.register_processor(PillMultiModalProcessor, **_PROCESSOR)
class PillLlamaForCausalLM(PillServedCausalLM, LlamaForCausalLM, SupportsMultiModal):
    """LLaMA and Mistral bases (vLLM runs both with its LLaMA model; Mistral's window is vLLM's model-wide one)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        _refuse_parallelism(vllm_config)
        LlamaForCausalLM.__init__(self, vllm_config=vllm_config, prefix=prefix, layer_type=PillLlamaVllmDecoderLayer)
        self._pill_setup(vllm_config)

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=PillLlamaVllmDecoderLayer):
        return PillLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


class _PillQwenForCausalLM(PillServedCausalLM):
    """The body of vLLM's Qwen2ForCausalLM / Qwen3ForCausalLM constructors (which build their model class
    themselves) with the PILL model and layers; one device."""

    layer_type: type

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        _refuse_parallelism(vllm_config)
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config.get_text_config()
        self.config = config
        self.vllm_config = vllm_config
        self.quant_config = vllm_config.quant_config
        self.model = PillQwenModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                   decoder_layer_type=self.layer_type)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        self._pill_setup(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(PillMultiModalProcessor, **_PROCESSOR)
class PillQwen2ForCausalLM(_PillQwenForCausalLM, Qwen2ForCausalLM, SupportsMultiModal):
    layer_type = PillQwen2VllmDecoderLayer


@MULTIMODAL_REGISTRY.register_processor(PillMultiModalProcessor, **_PROCESSOR)
class PillQwen3ForCausalLM(_PillQwenForCausalLM, Qwen3ForCausalLM, SupportsMultiModal):
    layer_type = PillQwen3VllmDecoderLayer
