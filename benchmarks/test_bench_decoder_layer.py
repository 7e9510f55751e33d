"""One decoder layer, forward and forward+backward, with frozen base weights and peak memory (issue 7, level 2).

GPU: LLaMA-7B shapes (D=4096, 32 heads, FFN 11008, r=32), bf16, B x S / image tokens in
{4x512/32, 4x1024/256, 2x2048/576}. Paths: the plain LLaMA layer (sdpa, no adapters); each method's layer on the
eager backend and on the fused one ("auto": whatever dispatch picks on this device); PILL's seed formulation
(`seed_pill.py`). Backward goes to the layer input and every trainable adapter parameter.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pill
import pill_kernels as pk

from conftest import DEVICE, ON_GPU as FULL, seed_everything  # LLaMA-7B widths only on a GPU
from seed_pill import seed_pill_layer

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = [(4, 512, 32), (4, 1024, 256), (2, 2048, 576)] if FULL else [(2, 24, 5)]
IMAGE_TOKEN = 127
PATHS = [("plain", "sdpa"), ("pill", "seed"), ("pill", "eager"), ("pill", "auto"), ("lavin", "eager"),
         ("lavin", "auto"), ("llama_adapter_v2", "eager"), ("llama_adapter_v2", "auto")]


def llama_config() -> LlamaConfig:
    if FULL:
        size = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    else:
        size = dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(vocab_size=128, num_hidden_layers=1, max_position_embeddings=4096, attn_implementation="sdpa",
                       **size)


def build(method: str):
    seed_everything()
    model = LlamaForCausalLM(llama_config()).to(DEVICE, DTYPE)
    rank = 32 if FULL else 8
    if method == "pill":
        model = pill.inject_pill(model, pill.PillConfig(adapter_dim=rank), vision_dim=64, image_token_id=IMAGE_TOKEN)
    elif method == "lavin":
        model = pill.inject_lavin(model, pill.LavinConfig(adapter_dim=rank), vision_dim=64,
                                  image_token_id=IMAGE_TOKEN)
    elif method == "llama_adapter_v2":
        model = pill.inject_llama_adapter_v2(model, pill.LlamaAdapterV2Config(prompt_layers=1), vision_dim=64)
    else:
        model.requires_grad_(False)
        return model, []
    pill.set_stage(model, model.multimodal.config.stages[-1])
    with torch.no_grad():  # zero-initialised adapters would let kernels skip work they must do in training
        for p in model.trainable_parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, model.trainable_parameters()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}xS{}-img{}".format(*s))
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("method,path", PATHS, ids=[f"{m}-{p}" for m, p in PATHS])
def test_decoder_layer(benchmark, method, path, pass_, shape):
    batch, seq, image_tokens = shape
    backward = pass_ == "forward_backward"
    model, params = build(method)
    layer = model.model.layers[0]
    hidden = torch.randn(batch, seq, model.config.hidden_size, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    image = torch.zeros(batch, seq, dtype=torch.bool, device=DEVICE)
    image[:, 2:2 + image_tokens] = True
    positions = torch.arange(seq, device=DEVICE)[None].expand(batch, -1)
    position_embeddings = model.model.rotary_emb(hidden, positions)
    kwargs = {}
    if method == "pill":
        kwargs = {"mm_token_type_ids": image.long()}
    elif method == "lavin":
        kwargs = {"mm_routing_weights": torch.softmax(torch.randn(batch, 1, 2, device=DEVICE, dtype=DTYPE), -1)}
    elif method == "llama_adapter_v2":
        kwargs = {"mm_visual_prompts": torch.randn(batch, 10, model.config.hidden_size, device=DEVICE, dtype=DTYPE)}
    grad = torch.randn_like(hidden)
    inputs = ([hidden] if backward else []) + (list(params) if backward else [])

    def layer_forward():
        if path == "seed":
            return seed_pill_layer(layer, hidden, image, position_embeddings)
        with pk.use_backend("auto" if path == "sdpa" else path):
            out = layer(hidden, position_embeddings=position_embeddings, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def step():
        out = layer_forward()
        if backward:
            torch.autograd.backward(out, grad, inputs=inputs)
        return out

    step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_memory_MiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    benchmark.extra_info.update(op="decoder_layer", backend=f"{method}-{path}", pass_=pass_, batch=batch, seq=seq,
                                image_tokens=image_tokens, hidden=model.config.hidden_size, dtype=str(DTYPE),
                                device=str(DEVICE), kernels=_kernels_used(path))
    benchmark(step)


def _kernels_used(path: str) -> str:
    if path not in ("auto", "eager"):
        return path
    return ", ".join(f"{op}: {pk.explain(op, DEVICE, path)[0]}" for op in pk.dispatch.registered_ops())
