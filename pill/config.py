"""Configuration objects of the three methods. Every field has the seed code's value as its default."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from pill_kernels.dispatch import CHOICES


@dataclass
class _MethodConfig:
    method: ClassVar[str]
    stages: ClassVar[tuple[int, ...]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "_MethodConfig":
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
        if self.backend is not None and self.backend not in CHOICES:
            raise ValueError(f"{type(self).__name__}.backend must be None or one of {CHOICES}, got {self.backend!r}")


@dataclass
class PillConfig(_MethodConfig):
    """PILL: a GLU attention adapter, the modality attention gate (MAG) and MoMAE experts in every layer.

    adapter_dim: GLU bottleneck r (seed: 32).
    gate_per: "kv_head" gates each key/value head's values before attention (works with any attention
        implementation and the KV cache); "query_head" gives each query head its own gate inside the attention,
        which only differs from "kv_head" on GQA models.
    stage1_invert_last_layer: in stage 1 the seed routes the last layer's text tokens to the visual expert (and
        image tokens to the text expert) so that the last visual expert gets a gradient.
    projector: "linear" (seed: Linear(C, D), no bias) or "mlp" (Linear-SiLU-Linear).
    backend: kernel backend for the fused ops; None follows `pill_kernels.get_backend()`.
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


@dataclass
class LavinConfig(_MethodConfig):
    """LaVIN's mixture-of-modality adaptation: a soft-routed RepAdapter before attention in every layer.

    adapter_dim: bottleneck (seed: 8); groups: groups of the up-projection 1x1 convolutions (seed: 2);
    num_experts: up-projection experts (seed: 2); scale: s (seed: 1); temperature: router softmax
    temperature (seed: 10 for 7B, 5 for 13B); dropout: on the bottleneck in training (seed: 0.1);
    projector_hidden: width of the image-feature MLP (seed: 128).
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
    backend: str | None = None

    def __post_init__(self) -> None:
        self._positive(adapter_dim=self.adapter_dim, groups=self.groups, num_experts=self.num_experts,
                       projector_hidden=self.projector_hidden)
        if self.adapter_dim % self.groups:
            raise ValueError(f"LavinConfig.adapter_dim ({self.adapter_dim}) must be a multiple of groups "
                             f"({self.groups})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LavinConfig.dropout must lie in [0, 1), got {self.dropout}")
        if self.temperature <= 0:
            raise ValueError(f"LavinConfig.temperature must be positive, got {self.temperature}")
        self._check_backend()


@dataclass
class LlamaAdapterV2Config(_MethodConfig):
    """LLaMA-Adapter V2: zero-init gated adaption prompts in the last layers, visual features added to them,
    and bias / norm tuning.

    prompt_len: prompts per layer K (seed: 10); prompt_layers: how many of the last layers get prompts (None:
    all but the first, as the seed's 31 of 32); bias_tuning: zero-init biases on q, o, gate, up, down
    projections; norm_tuning: RMSNorm weights trainable in stage 2; visual_blocks / visual_heads: the
    transformer blocks that turn image features into the K visual prompts (seed: 8 blocks of 16 heads).
    """

    method: ClassVar[str] = "llama_adapter_v2"
    stages: ClassVar[tuple[int, ...]] = (1, 2)

    prompt_len: int = 10
    prompt_layers: int | None = None
    bias_tuning: bool = True
    norm_tuning: bool = True
    visual_blocks: int = 8
    visual_heads: int = 16
    backend: str | None = None

    def __post_init__(self) -> None:
        self._positive(prompt_len=self.prompt_len, visual_heads=self.visual_heads)
        if self.prompt_layers is not None:
            self._positive(prompt_layers=self.prompt_layers)
        if not isinstance(self.visual_blocks, int) or self.visual_blocks < 0:
            raise ValueError(f"LlamaAdapterV2Config.visual_blocks must be a non-negative integer, "
                             f"got {self.visual_blocks!r}")
        self._check_backend()


METHOD_CONFIGS: dict[str, type[_MethodConfig]] = {
    cls.method: cls for cls in (PillConfig, LavinConfig, LlamaAdapterV2Config)
}
