"""The LLM families the three methods run on, and everything in which their decoder blocks differ, in one table.

LLaMA, Mistral, Qwen2 (Qwen2.5 uses the same classes) and Qwen3 share the pre-norm block the methods are defined
on: RMSNorm, q/k/v/o projections with RoPE (the model computes cos / sin, scaling included, and hands them to
every layer), grouped-query attention, a SwiGLU MLP. They differ in three places, and only there:

- biases on the attention projections: Qwen2's q/k/v always (not o); LLaMA's and Qwen3's q/k/v/o where
  ``config.attention_bias``; Mistral's never. The projections are the base's own modules, called as they are,
  so a bias is applied wherever the family has one without anything here;
- Qwen3's per-head RMSNorm on queries and keys (``q_norm`` / ``k_norm`` over the head dimension), applied after
  the projection (and its bias) and before RoPE: `Family.query_key_norms`, `Family.key_norm`;
- sliding-window attention: Mistral's on every layer when ``config.sliding_window`` is set, Qwen2's and
  Qwen3's on the layers that ``config.layer_types`` marks ``"sliding_attention"`` (``use_sliding_window``,
  ``max_window_layers``): `Family.layer_windows`. A query sees the keys at most ``window - 1`` positions
  before its own; the method layers apply the window wherever they attend (the model's per-type masks, flash
  attention's argument, the gated-attention op's ``window``), and a sliding-window KV cache returns only the
  keys within it.

A model's family is looked up by its exact class (`family_of`): a subclass may change the forward the method
layers re-implement, so it is refused rather than assumed. Other families are refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer


class UnsupportedBaseError(TypeError):
    """A base model (or its config) of a family, or with a feature, that the methods do not run on."""


def _no_windows(config) -> list[int | None]:
    return [None] * config.num_hidden_layers


def _config_window(config) -> list[int | None]:
    # MistralAttention passes config.sliding_window for every layer; Mistral's layer_types, if given, is ignored.
    return [getattr(config, "sliding_window", None)] * config.num_hidden_layers


def _layer_type_windows(config) -> list[int | None]:
    # As Qwen2Attention / Qwen3Attention set self.sliding_window: the config's window on "sliding_attention"
    # layers. Any other layer type, and a sliding layer without a window (on which transformers' mask builder
    # raises), is returned as the type itself, which check_config refuses.
    windows = []
    for layer_type in config.layer_types[:config.num_hidden_layers]:
        if layer_type == "full_attention":
            windows.append(None)
        elif layer_type == "sliding_attention" and config.sliding_window is not None:
            windows.append(config.sliding_window)
        else:
            windows.append(layer_type)
    return windows


@dataclass(frozen=True)
class Family:
    """One supported family: its transformers classes and how its attention differs from LLaMA's."""

    name: str  # the config's model_type
    label: str  # as docs and errors name it
    causal_lm: type
    decoder_layer: type
    # Per-head RMSNorm on q and k (the attention module's q_norm / k_norm), after projection and bias, before RoPE.
    qk_norm: bool
    # Whether the q/k/v projections carry biases, from the config (documentation and tests; the projections
    # are called as modules, so their biases need nothing here).
    qkv_bias: Callable[[object], bool]
    # Each layer's sliding window (None: full causal attention), read as the family's attention module reads it.
    layer_windows: Callable[[object], list]
    # The config fields that switch sliding windows on, for the refusal.
    window_fields: str

    def query_key_norms(self, attn, q: torch.Tensor, k: torch.Tensor):
        """q [B, S, H, hd] and k [B, S, Hkv, hd] straight out of the projections, through the family's per-head
        norms where it has them (the attention module's own, with transformers' rounding)."""
        if not self.qk_norm:
            return q, k
        return attn.q_norm(q), attn.k_norm(k)

    def key_norm(self, attn, k: torch.Tensor) -> torch.Tensor:
        """Keys [..., Hkv, hd] out of k_proj through the family's key norm, if it has one."""
        return attn.k_norm(k) if self.qk_norm else k


LLAMA = Family("llama", "LLaMA", LlamaForCausalLM, LlamaDecoderLayer, qk_norm=False,
               qkv_bias=lambda config: bool(getattr(config, "attention_bias", False)),
               layer_windows=_no_windows, window_fields="")
MISTRAL = Family("mistral", "Mistral", MistralForCausalLM, MistralDecoderLayer, qk_norm=False,
                 qkv_bias=lambda config: False, layer_windows=_config_window, window_fields="sliding_window")
QWEN2 = Family("qwen2", "Qwen2 / Qwen2.5", Qwen2ForCausalLM, Qwen2DecoderLayer, qk_norm=False,
               qkv_bias=lambda config: True, layer_windows=_layer_type_windows,
               window_fields="use_sliding_window / layer_types")
QWEN3 = Family("qwen3", "Qwen3", Qwen3ForCausalLM, Qwen3DecoderLayer, qk_norm=True,
               qkv_bias=lambda config: bool(getattr(config, "attention_bias", False)),
               layer_windows=_layer_type_windows, window_fields="use_sliding_window / layer_types")

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3)}
_BY_CLASS = {f.causal_lm: f for f in FAMILIES.values()}


def supported() -> str:
    return ", ".join(f"{f.causal_lm.__name__} ({f.label})" for f in FAMILIES.values())


def family_of(model) -> Family:
    """The family of `model`, a plain transformers CausalLM of a supported family (exact class), with a config
    the methods run exactly (`check_config`); UnsupportedBaseError naming the class otherwise."""
    family = _BY_CLASS.get(type(model))
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise UnsupportedBaseError(
            f"expected a transformers {supported()}, got {type(model).__name__} (model_type {model_type!r}); "
            f"PILL, LaVIN and LLaMA-Adapter V2 are implemented for these families (docs/methods.md, "
            f"\"Base model families\")")
    check_config(family, model.config, type(model).__name__)
    return family


def family_of_config(config, where: str = "model") -> Family:
    """The family of a transformers config (its model_type), checked as `family_of` checks a model's."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedBaseError(
            f"{where}: model_type {model_type!r} is not supported; PILL, LaVIN and LLaMA-Adapter V2 run on "
            f"{', '.join(repr(name) for name in FAMILIES)} ({supported()})")
    check_config(family, config, where)
    return family


def check_config(family: Family, config, where: str) -> None:
    """Refuse, by name, a layer type the method layers do not implement (transformers' families have full and
    sliding-window attention layers; a sliding layer needs a window, without which transformers' mask builder
    fails too)."""
    odd = sorted({w for w in family.layer_windows(config) if isinstance(w, str)})
    if odd:
        raise UnsupportedBaseError(f"{where} ({family.label}): config.layer_types holds {odd} (with "
                                   f"config.sliding_window={getattr(config, 'sliding_window', None)}); supported are "
                                   f"'full_attention' layers and 'sliding_attention' layers with a window")

