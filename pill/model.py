"""The multimodal model (`MultimodalCausalLM`: forward and generate with image features) and the functions over
a model with a method injected: stages, adapter parameters, kernel backend.

The methods themselves live in `pill.methods` (one module each). Their inject functions
(`inject_pill(model, PillConfig(), vision_dim=...)`, `inject_lavin`, `inject_llama_adapter_v2`) modify a
transformers CausalLM of a supported family (`pill.families`: LLaMA, Mistral, Qwen2 / Qwen2.5, Qwen3) in place
and return it: the decoder layers become the method's layer classes for that family (base weights untouched and
frozen), the model becomes the family's multimodal class (`MultimodalLlamaForCausalLM`,
`MultimodalQwen2ForCausalLM`, ...: `MultimodalCausalLM` over the family's CausalLM), and ``model.multimodal``
holds the method's model-level module (projector, modality token, prompts).

Image features follow the LLaVA convention for PILL and LaVIN: the text holds ``image_token_id`` placeholders
(the id may lie outside the vocabulary), and ``image_features`` [N_images, tokens, C] (the output of any frozen
vision encoder) are projected and scattered into the placeholder positions in order. LLaMA-Adapter V2 adds
visual features to its prompts instead: ``image_features`` [B, tokens, C], one image per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from .families import FAMILIES, Family, family_of
from .hf_compat import CAUSAL_LM_CACHE_ARG, take_cache
from .llm import is_quantized, keep_quantized_base_trainable, set_quantized_compute_dtype

if TYPE_CHECKING:
    from .methods.base import MultimodalAdapter


def check_base(model) -> Family:
    """The family of `model`, a plain transformers CausalLM the methods can be injected into; refused by name
    otherwise: already injected, another family (its class named), a config the layers cannot run exactly
    (sliding windows, for now)."""
    if isinstance(model, MultimodalCausalLM):
        raise ValueError(f"this model already has the {model.multimodal.config.method!r} adapters injected")
    return family_of(model)


IGNORE_INDEX = -100


def upcast_half(t: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 logits to fp32 for the cross-entropy (as transformers' loss does); fp32 and fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass
class SupervisedCausalLMOutput(CausalLMOutputWithPast):
    """What ``forward(..., logits_to_keep="supervised")`` returns: ``logits`` [N, V] of the N positions whose
    next token is supervised (row-major over batch and sequence), ``targets`` [N] their next tokens, and
    ``loss`` the mean cross-entropy over them (or its sum over ``num_items_in_batch``, as transformers does)."""

    targets: torch.LongTensor | None = None


class MultimodalCausalLM:
    """A CausalLM of a supported family with a method injected: the mixin before the family's class in
    `MULTIMODAL_CLASSES` (``MultimodalQwen2ForCausalLM(MultimodalCausalLM, Qwen2ForCausalLM)``), whose forward,
    generate and input preparation it extends (``super()`` is the family's). Created by the `inject_*`
    functions, never directly."""

    multimodal: nn.Module  # the method's model-level module, a pill.methods.base.MultimodalAdapter
    family: Family

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, image_features=None,
                mm_token_type_ids=None, sequence_modality=None, visual_prompts=None, images=None, sequence_ids=None,
                **kwargs):
        """The family CausalLM's forward plus ``image_features``, ``mm_token_type_ids`` [B, S] (derived from the
        placeholders when omitted), ``sequence_modality`` [B] (LaVIN; derived from the mask when omitted),
        precomputed ``visual_prompts`` [B, K, D] (LLaMA-Adapter V2), and ``images`` for the attached frozen
        vision encoder (instead of ``image_features``). The KV cache may be passed as ``past_key_values`` or
        ``cache`` (the name transformers uses since 5.24).

        ``logits_to_keep="supervised"`` (with ``labels``, for training) runs the LM head only on the positions
        whose next token is supervised, wherever they are in the row, as one contiguous [N, D] x [D, V] GEMM,
        and returns a `SupervisedCausalLMOutput`: on a small model the LM head over every kept position is a
        large share of the step, and a [B, K, D] slice makes it a batched matmul that copies the weight per
        row (measured on CPU).

        Packed rows (several examples per row, for training and scoring; `pill.packing`): ``sequence_ids``
        [B, S] gives each token's example (numbered over the batch, -1 for the padding at a row's end) and
        replaces ``attention_mask``: each token attends causally within its own example only, positions restart
        at 0 per example (unless ``position_ids`` are given), no label crosses from one example to the next,
        and the per-example inputs (``sequence_modality`` [N], LLaMA-Adapter V2's ``image_features`` [N, ...])
        are indexed by example."""
        with compute_autocast(self):
            return self._forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels,
                                 use_cache, logits_to_keep, image_features, mm_token_type_ids, sequence_modality,
                                 visual_prompts, images, sequence_ids, **kwargs)

    def _forward(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels, use_cache,
                 logits_to_keep, image_features, mm_token_type_ids, sequence_modality, visual_prompts, images,
                 sequence_ids, **kwargs):
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
                 "batch": inputs_embeds.shape[0], "sequence_ids": None}
        if sequence_ids is not None:
            from .packing import packed_model_inputs

            sequence_ids, attention_mask, position_ids, labels = packed_model_inputs(
                self.config, self.family, sequence_ids, inputs_embeds, attention_mask, position_ids, labels, cache,
                use_cache)
            extra["sequence_ids"] = sequence_ids
            use_cache = False
        if getattr(mm, "compute_dtype", None) is not None:
            # A half-precision base keeps its residual stream in fp32, as autocast over fp32 weights (the seeds'
            # recipe) does: the matmuls run in half precision, the residual sums, the norms and the adapters in
            # fp32.
            inputs_embeds = inputs_embeds.float()
        layer_kwargs = mm.layer_kwargs(self, mm_token_type_ids, image_features, extra, cache)
        if sequence_ids is not None:
            layer_kwargs["mm_sequence_ids"] = sequence_ids
        if isinstance(logits_to_keep, str):
            return self._supervised_forward(logits_to_keep, labels, cache, use_cache, dict(
                attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                mm_token_type_ids=mm_token_type_ids, **layer_kwargs, **kwargs))
        kwargs[CAUSAL_LM_CACHE_ARG] = cache
        return super().forward(attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, mm_token_type_ids=mm_token_type_ids,
                               **layer_kwargs, **kwargs)

    def _supervised_forward(self, logits_to_keep, labels, cache, use_cache, model_kwargs):
        if logits_to_keep != "supervised":
            raise ValueError(f"logits_to_keep must be an int, a tensor of positions or 'supervised', got "
                             f"{logits_to_keep!r}")
        if labels is None:
            raise ValueError("logits_to_keep='supervised' needs labels: it keeps the positions they supervise")
        if cache is not None or use_cache:
            raise ValueError("logits_to_keep='supervised' is for training: pass no cache and use_cache=False")
        num_items = model_kwargs.pop("num_items_in_batch", None)
        hidden = self.model(use_cache=False, **model_kwargs).last_hidden_state
        if tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"labels must have shape [batch, seq] = {tuple(hidden.shape[:2])}, got "
                             f"{tuple(labels.shape)}")
        next_tokens = labels[:, 1:].to(hidden.device)
        supervised = next_tokens != IGNORE_INDEX
        targets = next_tokens[supervised]
        logits = self.lm_head(hidden[:, :-1][supervised])
        loss = F.cross_entropy(upcast_half(logits), targets, reduction="sum")
        loss = loss / (num_items if num_items is not None else max(targets.numel(), 1))
        return SupervisedCausalLMOutput(loss=loss, logits=logits, targets=targets)

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
        # Generated tokens are text, embedded from the table: an image token id that lies in the vocabulary
        # (a tokenizer's added <image>) and is generated is not an image placeholder.
        embeds = prompt_embeds[:, start:]
        if generated:
            embeds = torch.cat([embeds, self.get_input_embeddings()(input_ids[:, total - generated:])], dim=1)
        inputs["inputs_embeds"] = embeds
        inputs["input_ids"] = None
        return inputs

    # -- conveniences ------------------------------------------------------------------------------------
    def set_stage(self, stage: int) -> None:
        set_stage(self, stage)

    def set_kernel_backend(self, backend: str | None) -> None:
        set_kernel_backend(self, backend)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _multimodal_class(family: Family) -> type:
    name = f"Multimodal{family.causal_lm.__name__}"
    return type(name, (MultimodalCausalLM, family.causal_lm),
                {"family": family, "__module__": __name__, "__qualname__": name,
                 "__doc__": f"A {family.causal_lm.__name__} with a method injected (`MultimodalCausalLM`)."})


# One class per family, named in this module so that injected models pickle.
MULTIMODAL_CLASSES: dict[str, type] = {name: _multimodal_class(family) for name, family in FAMILIES.items()}
globals().update({cls.__name__: cls for cls in MULTIMODAL_CLASSES.values()})
MultimodalLlamaForCausalLM = MULTIMODAL_CLASSES["llama"]


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


def _features(mm: "MultimodalAdapter", images, image_features):
    if images is None:
        return image_features
    if image_features is not None:
        raise ValueError("pass images or image_features, not both")
    return mm.encode_images(images)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward instead of keeping them (less memory, one more
    forward per layer), non-reentrant as the methods require. transformers 5.x calls it activation
    checkpointing; the older name stays for the releases before the rename."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not any(getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers):
        raise RuntimeError(f"{type(model).__name__}: enabling gradient checkpointing left every decoder layer "
                           f"without it")


def _refuse_reentrant_checkpointing(model) -> None:
    for layer in model.model.layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(layer, "gradient_checkpointing", False) and getattr(func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "gradient checkpointing with use_reentrant=True drops the gradients of per-call inputs that reach "
                "the layers as keyword arguments (LaVIN routing, LLaMA-Adapter V2 visual prompts); enable it with "
                "gradient_checkpointing_kwargs={'use_reentrant': False}")


# ----------------------------------------------------------------------------------------------------------
# Injection (the last step of every method's inject function)
# ----------------------------------------------------------------------------------------------------------

def attach_method(model, family: Family, multimodal: "MultimodalAdapter",
                  vision_encoder=None) -> MultimodalCausalLM:
    """Freeze the base, move the new adapters to the model's device, make the model its family's multimodal
    class holding `multimodal`, apply the config's kernel backend and start at the method's first stage."""
    multimodal.set_vision_encoder(vision_encoder)
    device = model.get_input_embeddings().weight.device
    for p in model.parameters():
        p.requires_grad_(False)
    if is_quantized(model):
        keep_quantized_base_trainable(model)
    # Adapters stay fp32 (the seed keeps them fp32 under autocast) but live on the model's device.
    multimodal.to(device)
    for layer in model.model.layers:
        for name, p in layer.named_parameters():
            if name.startswith("pill_") and p.device != device:
                p.data = p.data.to(device)
    model.__class__ = MULTIMODAL_CLASSES[family.name]
    model.multimodal = multimodal
    model.train(model.training)  # new submodules start in training mode; follow the model's mode
    set_kernel_backend(model, multimodal.config.backend)
    set_stage(model, multimodal.stage)
    return model


# ----------------------------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------------------------

def multimodal_of(model) -> "MultimodalAdapter":
    if not isinstance(model, MultimodalCausalLM):
        raise TypeError(f"expected a model returned by inject_pill / inject_lavin / inject_llama_adapter_v2, got "
                        f"{type(model).__name__}")
    return model.multimodal


def stage_parameters(model, stage: int) -> dict[str, nn.Parameter]:
    """The parameters trained in `stage`, by name."""
    mm = multimodal_of(model)
    if stage not in mm.config.stages:
        raise ValueError(f"{mm.method} has stages {mm.config.stages}, got stage {stage!r}")
    return mm.stage_parameters(model, stage)


def adapter_parameters(model) -> dict[str, nn.Parameter]:
    """Every parameter the method trains in any stage: what an adapter checkpoint holds."""
    mm = multimodal_of(model)
    names: dict[str, nn.Parameter] = {}
    for stage in mm.config.stages:
        names.update(mm.stage_parameters(model, stage))
    return dict(sorted(names.items()))


def set_stage(model, stage: int) -> None:
    """Make exactly `stage`'s parameters trainable and switch stage-dependent behaviour (PILL's MAG bypass and
    last-layer routing in stage 1)."""
    mm = multimodal_of(model)
    trainable = stage_parameters(model, stage)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    mm.stage = stage
    mm.apply_stage(model, stage)


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float64": torch.float64}
HALF_DTYPES = (torch.bfloat16, torch.float16)


class FullPrecisionLinear(nn.Linear):
    """The LM head under a half-precision base: its weight stays fp32 and it runs outside autocast on fp32
    inputs, so the logits the loss reads and the gradient the head sends back into the residual stream carry
    no bf16 rounding. In training it runs on the supervised positions only, so fp32 costs little. (The PILL
    demo with a bf16 base: 78.0% held-out with a bf16 head and projector, 94.0% with both in fp32 on an Intel
    AMX CPU, but 79.7% with both in fp32 on an AMD AVX-512 BF16 CPU: it is not the whole story; fp32 bases
    reach 95%. docs/training.md, "Compute dtype of the frozen base".)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.to(self.weight.dtype)
            return F.linear(x.to(self.weight.dtype), self.weight, bias)


def set_compute_dtype(model, dtype: torch.dtype | str, attention_dtype: torch.dtype | str | None = None) -> None:
    """Run the frozen base in `dtype` (float32, bfloat16, float16; float64 for ground truths) while the adapters stay in their own dtype
    (fp32 as created): the frozen parameters are cast once, and the model's forward (training, evaluation,
    generation) runs under autocast to `dtype`, so that fp32 adapters, tuned norms and biases meet half-precision
    activations as in the seeds' fp32-adapters-under-bf16-autocast recipe. float32 casts the base back and turns
    autocast off. `attention_dtype` runs the decoder layers' attention in another dtype (its inputs cast, the
    output cast back), e.g. fp32 on a CPU where flash attention is faster in fp32
    (`pill.machine.choose_attention_dtype`); None: the activations' dtype.

    Under a half-precision `dtype` the LM head (with the input embedding it is tied to) stays fp32 and runs
    outside autocast (`FullPrecisionLinear`), as the methods' projectors do: bf16 logits and the gradient they
    send back cost the trained adapters accuracy (docs/training.md, "Compute dtype of the frozen base")."""
    if isinstance(dtype, str):
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, got {dtype!r}")
        dtype = COMPUTE_DTYPES[dtype]
    if dtype not in COMPUTE_DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, got {dtype}")
    mm = multimodal_of(model)
    half = dtype in HALF_DTYPES
    full_precision = {id(p) for p in adapter_parameters(model).values()}
    if half:
        full_precision |= {id(p) for p in model.lm_head.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            # Adapters made in the base's half dtype (LLaMA-Adapter V2's biases follow the weight's) go to fp32.
            want = dtype if id(p) not in full_precision else torch.promote_types(p.dtype, torch.float32)
            if p.is_floating_point() and p.dtype != want:
                p.data = p.data.to(want)
    set_quantized_compute_dtype(model, dtype)
    if type(model.lm_head) in (nn.Linear, FullPrecisionLinear):
        model.lm_head.__class__ = FullPrecisionLinear if half else nn.Linear
    elif half:
        raise TypeError(f"set_compute_dtype: the LM head is a {type(model.lm_head).__name__}, not an nn.Linear; "
                        f"it cannot be kept in full precision under a {dtype} base")
    mm.compute_dtype = dtype if half else None
    if isinstance(attention_dtype, str):
        attention_dtype = COMPUTE_DTYPES[attention_dtype]
    attention_dtype = None if attention_dtype == dtype else attention_dtype
    mm.attention_dtype = attention_dtype
    for layer in model.model.layers:
        layer.attention_dtype = attention_dtype


def compute_dtype(model) -> torch.dtype:
    """The frozen base's compute dtype (`set_compute_dtype`)."""
    return getattr(multimodal_of(model), "compute_dtype", None) or model.get_input_embeddings().weight.dtype


def compute_autocast(model):
    """The autocast context of the model's compute dtype (a no-op context when none is set or autocast is on)."""
    import contextlib

    dtype = getattr(model.multimodal, "compute_dtype", None)
    device = model.get_input_embeddings().weight.device.type
    if dtype is None or torch.is_autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype)


def set_kernel_backend(model, backend: str | None) -> None:
    """Run this model's fused ops on `backend` ("eager", "triton", "cuda", "cpp", "auto"), or None to follow
    pill_kernels' default (`pill_kernels.use_backend` / `set_backend`, then $PILL_KERNELS_BACKEND, then auto).
    A run-time choice: adapters are saved without it and load under any backend."""
    from .methods.base import check_backend

    check_backend(backend)
    multimodal_of(model).kernel_backend = backend
    for module in model.modules():
        if hasattr(module, "kernel_backend"):
            module.kernel_backend = backend


def kernel_backend(model) -> str | None:
    """The backend set with `set_kernel_backend` (None: pill_kernels' default)."""
    return multimodal_of(model).kernel_backend


def trainable_parameter_report(model) -> str:
    """Trainable parameter counts of every stage, split by component."""
    mm = multimodal_of(model)
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
