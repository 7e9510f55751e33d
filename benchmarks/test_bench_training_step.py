"""A PILL training step (forward, backward, AdamW) of a LLaMA-shaped model with several layers: tokens/s and
peak memory for the seed formulation, the eager PILL path and the fused path (issue 7, level 3).

GPU: 4 layers of LLaMA-7B width (D=4096, 32 heads, FFN 11008, vocabulary 32000), r=32, bf16 base, fp32
adapters, B x S = 4 x 1024 with 256 image tokens per sequence, stage 2.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pill
import pill_kernels as pk

from conftest import DEVICE, ON_GPU as FULL, seed_everything  # LLaMA-7B widths only on a GPU
from seed_pill import seed_pill_logits

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BATCH, SEQ, IMAGE_TOKENS = (4, 1024, 256) if FULL else (2, 24, 5)
VISION_DIM = 1024 if FULL else 16
PATHS = ["seed", "eager", "auto"]


def build():
    seed_everything()
    if FULL:
        size = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    num_hidden_layers=4, vocab_size=32000)
    else:
        size = dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=2, vocab_size=128)
    config = LlamaConfig(max_position_embeddings=4096, attn_implementation="sdpa", **size)
    model = LlamaForCausalLM(config).to(DEVICE, DTYPE)
    image_token = config.vocab_size - 1
    model = pill.inject_pill(model, pill.PillConfig(adapter_dim=32 if FULL else 8), vision_dim=VISION_DIM,
                             image_token_id=image_token)
    pill.set_stage(model, 2)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = torch.randint(3, image_token, (BATCH, SEQ), device=DEVICE)
    ids[:, 2:2 + IMAGE_TOKENS] = image_token
    features = torch.randn(BATCH, IMAGE_TOKENS, VISION_DIM, device=DEVICE, dtype=DTYPE)
    labels = ids.masked_fill(ids == image_token, -100)
    return model, ids, features, labels


@pytest.mark.parametrize("path", PATHS)
def test_pill_training_step(benchmark, path):
    model, ids, features, labels = build()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)

    def step():
        if path == "seed":
            logits = seed_pill_logits(model, ids, features)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        else:
            with pk.use_backend(path):
                loss = model(input_ids=ids, image_features=features, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_memory_MiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    benchmark.extra_info.update(op="training_step", backend=path, batch=BATCH, seq=SEQ, image_tokens=IMAGE_TOKENS,
                                layers=model.config.num_hidden_layers, hidden=model.config.hidden_size,
                                dtype=str(DTYPE), device=str(DEVICE), tokens_per_step=BATCH * SEQ)
    benchmark(step)
