"""Gated flash attention against PyTorch's scaled_dot_product_attention, forward and forward+backward.

GPU shapes (issue 4): bf16, H = Hkv = 32 heads of 128 (LLaMA-7B), B x S in {4x512, 4x1024, 2x2048, 1x8192},
a quarter of the keys image tokens. Variants:
- plain: causal attention, no gate: `triton` vs `sdpa` (the flash backend) vs `eager` (the eager op: sdpa
  behind dispatch, what auto runs when the Triton kernel is not measured faster);
- gate: PILL's value gate on image keys (logits from a D x H projection of the attention input): `triton`
  (projection + one fused launch) vs `two_launch` (the modality-gate op on V, then sdpa) vs `eager` (the eager
  op: gate applied to V in PyTorch, then sdpa), all against `sdpa` without a gate;
- prompt: LLaMA-Adapter V2's branch over 10 prompts: `triton` vs `eager`, against `sdpa` without it;
- gate+packed, prompt+packed: the same on packed rows of 4 examples each (`segment_ids`; 10 prompts per example
  with `prompt_segment_ids`): the Triton kernel skips the key blocks of other examples, eager masks them; both
  against `sdpa` causal over the whole row;
- gate+window: PILL's gate on a sliding-window layer (Mistral, Qwen's sliding layers) with a window of a
  quarter of the sequence: the Triton kernel skips the key blocks outside the window, eager masks them; against
  `sdpa` with the same window as a boolean mask.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pill_kernels as pk

from conftest import DEVICE, ON_GPU as FULL, seed_everything, skip_unless_runs  # full shapes only on a GPU

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
HEADS, HEAD_DIM, HIDDEN, PROMPTS = (32, 128, 4096, 10) if FULL else (2, 16, 24, 3)
SHAPES = [(4, 512), (4, 1024), (2, 2048), (1, 8192)] if FULL else [(1, 19)]
BACKENDS = {"plain": ["sdpa", "eager", "triton"], "gate": ["sdpa", "eager", "two_launch", "triton"],
            "prompt": ["sdpa", "eager", "triton"], "gate+packed": ["sdpa", "eager", "triton"],
            "prompt+packed": ["sdpa", "eager", "triton"], "gate+window": ["sdpa", "eager", "triton"]}
CASES = [(variant, backend) for variant, backends in BACKENDS.items() for backend in backends]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}xS{s[1]}")
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("variant,backend", CASES, ids=[f"{v}-{b}" for v, b in CASES])
def test_gated_attention(benchmark, variant, backend, pass_, shape):
    if backend in ("triton", "eager"):
        skip_unless_runs("gated_attention", backend)
    if backend == "two_launch":
        skip_unless_runs("modality_gate", "triton")
    seed_everything()
    batch, seq = shape
    backward = pass_ == "forward_backward"
    kw = dict(device=DEVICE, dtype=DTYPE)
    q, k, v = (torch.randn(batch, HEADS, seq, HEAD_DIM, **kw) for _ in range(3))
    attn_input = torch.randn(batch, seq, HIDDEN, **kw)
    w_gate = 0.02 * torch.randn(HIDDEN, HEADS, **kw)
    image = (torch.arange(seq, device=DEVICE) < seq // 4)[None].expand(batch, seq).contiguous()
    examples = 4 if variant.endswith("+packed") else 1  # per row
    segments = (torch.arange(seq, device=DEVICE) * examples // seq)[None].expand(batch, seq).contiguous()
    prompt_k, prompt_v = (torch.randn(batch, HEADS, PROMPTS * examples, HEAD_DIM, **kw) for _ in range(2))
    prompt_segments = (torch.arange(PROMPTS * examples, device=DEVICE) // PROMPTS)[None].expand(batch, -1)
    prompt_gate = torch.randn(HEADS, **kw)
    gate, prompt = variant.startswith("gate"), variant.startswith("prompt")
    window = max(seq // 4, 1) if variant.endswith("+window") else None
    positions = torch.arange(seq, device=DEVICE)
    distance = positions[:, None] - positions[None, :]
    window_mask = (distance >= 0) & (distance < window) if window else None
    leaves = [q, k, v] + ([attn_input, w_gate] if gate and backend != "sdpa" else []) + \
        ([prompt_k, prompt_v, prompt_gate] if prompt and backend != "sdpa" else [])
    for t in leaves:
        t.requires_grad_(backward)
    grad = torch.randn_like(q)

    def attention():
        if backend == "sdpa":
            if window:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if variant == "gate" and backend == "two_launch":
            v_tokens = v.transpose(1, 2).reshape(batch * seq, HEADS, HEAD_DIM)
            gated = pk.modality_gate(attn_input.reshape(batch * seq, HIDDEN), w_gate, v_tokens, image.reshape(-1),
                                     backend="triton")
            return F.scaled_dot_product_attention(q, k, gated.view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2),
                                                  is_causal=True)
        extra = {}
        if gate:
            extra = dict(gate_logits=(attn_input @ w_gate).transpose(1, 2), image_mask=image)
        if prompt:
            extra = dict(prompt_k=prompt_k, prompt_v=prompt_v, prompt_gate=prompt_gate)
        if examples > 1:
            extra["segment_ids"] = segments
            if prompt:
                extra["prompt_segment_ids"] = prompt_segments
        return pk.gated_attention(q, k, v, **extra, window=window, backend=backend)

    def step():
        out = attention()
        if backward:
            torch.autograd.backward(out, grad, inputs=leaves)
        return out

    step()
    benchmark.extra_info.update(op="gated_attention", backend=backend, pass_=pass_, variant=variant, batch=batch,
                                seq=seq, window=window, heads=HEADS, head_dim=HEAD_DIM, dtype=str(DTYPE),
                                device=str(DEVICE))
    benchmark(step)
