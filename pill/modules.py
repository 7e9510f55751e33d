"""Adapter modules of the three methods and the vision-side projectors.

Adapter weights live in fp32 (or whatever dtype they were created in) and are cast to the activation dtype
at call time, as the seed code's fp32 adapters under bf16 autocast do.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import pill_kernels as pk


def _rms_norm_args(norm: nn.Module | None, dtype: torch.dtype) -> dict:
    if norm is None:
        return {}
    return {"norm_weight": norm.weight.to(dtype), "eps": norm.variance_epsilon}


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

    def __init__(self, hidden_size: int, adapter_dim: int, expert_names: tuple[str, ...], backend: str | None = None):
        super().__init__()
        self.expert_names = expert_names
        self.experts = nn.ModuleDict({name: GLUExpert(hidden_size, adapter_dim) for name in expert_names})
        self.backend = backend

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None, norm: nn.Module | None = None):
        experts = [self.experts[name] for name in self.expert_names]
        stack = lambda attr: torch.stack([getattr(e, attr) for e in experts]).to(x.dtype)  # noqa: E731
        return pk.routed_glu_adapter(x, stack("w_down"), stack("w_gate"), stack("w_up"), expert_ids,
                                     backend=self.backend, **_rms_norm_args(norm, x.dtype))


class ModalityGate(nn.Module):
    """PILL's MAG weights ``W_g`` [D, heads], zero-initialised so that image tokens' values start switched off."""

    def __init__(self, hidden_size: int, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size, heads))


class SoftRoutedAdapter(nn.Module):
    """LaVIN's RepAdapter router: shared down-projection, E grouped up-projection experts, per-sequence softmax
    routing from the modality token. Initialisation as the seed: xavier down, zero up, nn.Linear router."""

    def __init__(self, hidden_size: int, adapter_dim: int, groups: int, num_experts: int, scale: float,
                 temperature: float, dropout: float, backend: str | None = None):
        super().__init__()
        if hidden_size % groups:
            raise ValueError(f"LaVIN: hidden size {hidden_size} must be a multiple of groups {groups}")
        self.groups, self.scale, self.temperature, self.dropout = groups, scale, temperature, dropout
        self.backend = backend
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
        """x [B, S, D] (or [B, D]); routing_weights [B, E], one row per sequence."""
        dtype = x.dtype
        token_weights = routing_weights.to(dtype).unsqueeze(-2).expand(*x.shape[:-1], routing_weights.shape[-1]) \
            if x.dim() == 3 else routing_weights.to(dtype)
        dropout_mask = None
        if self.training and self.dropout > 0:
            keep = torch.rand(*x.shape[:-1], self.w_down.shape[1], device=x.device) >= self.dropout
            dropout_mask = keep.to(dtype) / (1.0 - self.dropout)
        return pk.soft_routed_adapter(x, self.w_down.to(dtype), self.b_down.to(dtype), self.dense_up().to(dtype),
                                      self.b_up.to(dtype), token_weights, dropout_mask=dropout_mask,
                                      scale=self.scale, backend=self.backend, **_rms_norm_args(norm, dtype))


# ----------------------------------------------------------------------------------------------------------
# Vision side: from any encoder's features [N, tokens, C] to the LLM width.
# ----------------------------------------------------------------------------------------------------------

class LinearProjector(nn.Module):
    """PILL's projection: Linear(C, D) without bias, N(0, 0.02)."""

    def __init__(self, vision_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(vision_dim, hidden_size, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class MLPProjector(nn.Module):
    """LaVIN's AdapterMLP: Linear(C, h) - SiLU - Linear(h, D), xavier-initialised."""

    def __init__(self, vision_dim: int, hidden: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden_size)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(features)))


class VisualPromptProjector(nn.Module):
    """LLaMA-Adapter V2's visual query: ``LN(W_c F)``, K learned queries prepended, transformer blocks, the
    first K outputs projected to the LLM width and normalised. Returns [B, K, D]."""

    def __init__(self, vision_dim: int, hidden_size: int, num_queries: int, blocks: int, heads: int):
        super().__init__()
        if vision_dim % heads:
            raise ValueError(f"LLaMA-Adapter V2: vision_dim {vision_dim} must be a multiple of visual_heads {heads}")
        self.clip_proj = nn.Linear(vision_dim, vision_dim)
        self.clip_norm = nn.LayerNorm(vision_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, vision_dim))
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
